"""PLACEHOLDER: being written in this session; replaced before commit."""


def policy_loss(*args, **kwargs):
    raise NotImplementedError
