"""Test-only observer for tests/integration/test_elastic.py, put first on PYTHONPATH of the workers.

With ``ELASTIC_RECORD=DIR`` set (and ``RANK``: only torchrun's workers), every micro-batch that
``Trainer.train_step`` draws is appended to ``DIR/rank<R>.jsonl`` as
``{"epoch", "step" (the optimizer step it belongs to, 1-based), "rank", "index"}``: the sample
positions the run really trained on. It observes only; the batch is passed on unchanged.
"""

import json
import os

if os.environ.get("ELASTIC_RECORD") and "RANK" in os.environ:
    from invasive_dist import train as _train

    _orig = _train.Trainer.train_step

    def _recording_train_step(self, next_batch):
        path = os.path.join(os.environ["ELASTIC_RECORD"], f"rank{self.shard.rank}.jsonl")

        def recorded():
            batch = next_batch()
            row = {
                "epoch": self.epoch,
                "step": self.global_step + 1,
                "rank": self.shard.rank,
                "index": batch.index.tolist(),
            }
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")
            return batch

        return _orig(self, recorded)

    _train.Trainer.train_step = _recording_train_step
