"""A lab that drifts from the baseline on purpose (its AdamW learning rate is 1% off), so the
tour's red path is tested with a real run. Not a real lab: it lives with the tests."""
import torch

from dtlab.harness import add_common_args, run_lab
from dtlab.train.loop import Strategy


class Drifting(Strategy):
    variant = "drifting"

    def make_optimizer(self, params):
        return torch.optim.AdamW(params, lr=self.settings.lr * 1.01, betas=(0.9, 0.95),
                                 weight_decay=self.settings.weight_decay)

    def after_backward(self):
        if self.rt.distributed:  # plain gradient averaging, so the drift is the lr alone
            for p in self.model.parameters():
                torch.distributed.all_reduce(p.grad)
                p.grad /= self.rt.world_size


def make_parser():
    import argparse
    return add_common_args(argparse.ArgumentParser(prog="drift_lab"))


def main(argv=None):
    return run_lab("drift", make_parser(), lambda rt, s, a: Drifting(rt, s), argv)


if __name__ == "__main__":
    raise SystemExit(main())
