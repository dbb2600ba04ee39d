"""PLACEHOLDER: being written in this session; replaced before commit."""


def fused_linear_policy_loss(*args, **kwargs):
    raise NotImplementedError


def ReMaxLoss(*args, **kwargs):
    raise NotImplementedError
