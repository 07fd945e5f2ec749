"""The remaining pieces of fine-tuning and task evaluation: `raylm eval` of a pairs run counts
trained tokens only; batched greedy generation equals one-at-a-time; the Ray Data task path
gives the local path's --json.

Real sentencepiece, real torch, real files; Ray only where the item is about Ray.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from raylm.cli import main as cli_main
from support import local_config

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

SNIPPETS = {
    "os": ["os.path.join(a, b)", "os.getcwd()", "os.listdir('.')", "os.environ.get('HOME')"],
    "json": ["json.dumps(data)", "json.loads(text)", "json.dump(obj, f)", "json.JSONDecoder()"],
    "re": ["re.compile(pattern)", "re.sub('a', 'b', s)", "re.findall(r'\\d+', s)", "re.match(p, s)"],
    "math": ["math.sqrt(x)", "math.floor(2.5)", "math.pi * r * r", "math.log(x, 2)"],
}


@pytest.fixture(scope="module")
def pairs_run(local_run, tmp_path_factory):
    """A 2-step `format: pairs` fine-tune of the session's run (held-out evaluation at step 2
    over 20% of the records), and its config."""
    from raylm.train.local import train_local

    out = tmp_path_factory.mktemp("pairs_run")
    task = out / "train.jsonl"
    task.write_text("".join(json.dumps({"prompt": f"{code}  # {k}\nPackage:", "completion": f" {label}"}) + "\n"
                            for k in range(8) for label, codes in SNIPPETS.items() for code in codes))
    cfg = local_config(out, f"model.init_from={local_run.run_dir}", f"data.sources.0.path={task}",
                       "data.sources.0.format=pairs", "data.sources.0.max_bytes=null", "data.val_fraction=0.2",
                       "data.seq_len=64", "train.max_steps=2", "train.eval_every=2", "train.checkpoint_every=2",
                       "run.sample_tokens=0")
    return train_local(cfg, log=lambda line: None), cfg


def test_eval_of_a_pairs_run_counts_only_completion_tokens_and_gives_trainings_heldout_loss(pairs_run, tmp_path,
                                                                                            capsys):
    """`raylm eval RUN` on a pairs run's own held-out split normalises by the trained (completion)
    targets, as training's loss does: its loss equals the run's step-2 held-out loss (rel 1e-5),
    and its token count is `trained_count` of the rows, well below rows x seq_len."""
    from raylm.tokenizer import Tokenizer
    from raylm.train.step import trained_count
    from raylm.use.evaluate import local_rows

    result, cfg = pairs_run
    out = tmp_path / "eval.json"
    assert cli_main(["eval", result.run_dir, "--max-sequences", str(cfg.eval_sequences), "--json", str(out)]) == 0
    capsys.readouterr()
    numbers = json.loads(out.read_text())
    records = [json.loads(line) for line in (Path(result.run_dir) / "metrics.jsonl").read_text().splitlines()]
    val_loss = next(r["val_loss"] for r in records if r.get("step") == 2 and "val_loss" in r)
    assert numbers["loss"] == pytest.approx(val_loss, rel=1e-5)

    rows = np.concatenate(list(local_rows(cfg, Tokenizer.load(Path(result.run_dir) / "tokenizer.model"),
                                          "validation", cfg.eval_sequences)))
    trained = trained_count({"tokens": rows}, supervised=True)
    assert numbers["sequences"] == len(rows)
    assert numbers["tokens"] == trained < len(rows) * cfg.data.seq_len / 2
    assert 0 < numbers["bytes"] < numbers["tokens"] * 16
