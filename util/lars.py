"""LARS optimizer (layer-wise adaptive rate scaling) for linear probing with very large batches."""
import torch


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose update of each weight matrix is rescaled to trust_coefficient * |w| / |g|.

    1-D parameters (biases, norm weights) are neither decayed nor rescaled.
    """

    def __init__(self, params, lr: float = 0, weight_decay: float = 0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group['params']:
                update = p.grad
                if update is None:
                    continue
                if p.ndim > 1:
                    update = update.add(p, alpha=group['weight_decay'])
                    param_norm = torch.norm(p)
                    update_norm = torch.norm(update)
                    one = torch.ones_like(param_norm)
                    trust = torch.where(param_norm > 0.,
                                        torch.where(update_norm > 0,
                                                    group['trust_coefficient'] * param_norm / update_norm, one),
                                        one)
                    update = update.mul(trust)
                state = self.state[p]
                if 'mu' not in state:
                    state['mu'] = torch.zeros_like(p)
                mu = state['mu']
                mu.mul_(group['momentum']).add_(update)
                p.add_(mu, alpha=-group['lr'])
        return loss
