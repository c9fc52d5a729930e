"""Exercise: the dynamic loss scaler of mixed-precision training (docs/amp.md, labs/amp.py).

fp16 gradients underflow to zero when they are small, so the loss is multiplied by a large scale
before backward and the gradients divided by it afterwards. Too large a scale overflows (inf/NaN
gradients): that step must be skipped and the scale reduced. Write ``DynamicLossScaler.update``
with the rules of ``torch.amp.GradScaler``:

- overflow: scale *= backoff_factor, the count of clean steps restarts, the step is skipped;
- no overflow: count it; after ``growth_interval`` clean steps in a row, scale *= growth_factor
  and the count restarts.

    dtlab check loss_scaler --impl loss_scaler.py

The checker feeds your scaler overflow patterns and compares the scale after every step with
torch's own update kernel (``torch._amp_update_scale_``).
"""


class DynamicLossScaler:
    def __init__(self, init_scale=2.0**16, growth_factor=2.0, backoff_factor=0.5,
                 growth_interval=2000):
        self.scale = float(init_scale)
        self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
        self.growth_interval = growth_interval
        self.clean_steps = 0

    def update(self, overflow: bool) -> bool:
        """After a step's gradients were checked: adapt the scale; True if the step is taken."""
        # TODO: back off on overflow (and skip the step); grow after growth_interval clean steps
        raise NotImplementedError("TODO: DynamicLossScaler.update (back off on overflow, grow "
                                  "after growth_interval clean steps)")
