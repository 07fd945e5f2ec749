"""`raylm eval RUN --harness TASKS`: lm-evaluation-harness on a raylm model, through `RaylmLM`.

`RaylmLM` is lm-eval's `LM` over raylm's own model and tokenizer: its `loglikelihood`,
`loglikelihood_rolling` and `generate_until` are raylm.use.score's, which tokenise and window
as lm-eval's `HFLM` does. On the export of the same checkpoint (`raylm export`), HFLM gives the
same numbers (tested on local task definitions): for loglikelihood and multiple-choice tasks with
its defaults (the exported tokenizer adds BOS, as raylm's training did), for
loglikelihood_rolling tasks with `add_bos_token=False, prefix_token_id=<BOS>` (with BOS added
by the tokenizer, HFLM would also score BOS after BOS in the first window; raylm scores the
text's tokens only). RaylmLM needs no export, reads a run directory or a bucket like every
raylm command, and runs the model raylm trained, not a conversion of it.

Harness tasks usually download their data from the Hugging Face hub. Tasks of your own
(`dataset_path: json` with `dataset_kwargs: {data_files: ...}`, local files) are named through
`--include-path DIR`. lm-eval is the optional extra `raylm[eval]`.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

from raylm.errors import ConfigError


def _lm_eval():
    try:
        import lm_eval  # noqa: F401  (the package itself: a submodule another import left in sys.modules is not proof)
        from lm_eval.api.model import LM
    except ImportError:
        raise ConfigError("--harness needs lm-evaluation-harness: pip install 'raylm[eval]'") from None
    return LM


def raylm_lm(scorer):
    """An lm-eval `LM` over a raylm.use.score.Scorer (the class is made here, so lm-eval is
    imported only when the harness is used)."""
    LM = _lm_eval()

    class RaylmLM(LM):
        """lm-eval's three request types, answered by raylm.use.score."""

        def __init__(self, scorer):
            super().__init__()
            self.scorer = scorer

        def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            return self.scorer.loglikelihood([req.args for req in requests], progress=_bar(len(requests),
                                             "loglikelihood", disable_tqdm))

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            return self.scorer.loglikelihood_rolling([req.args[0] for req in requests],
                                                     progress=_bar(len(requests), "rolling", disable_tqdm))

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            """Requests with the same generation settings go together; each gives one continuation."""
            groups: dict[str, list[int]] = defaultdict(list)
            for i, req in enumerate(requests):
                groups[json.dumps(req.args[1], sort_keys=True, default=str)].append(i)
            out: list[str] = [""] * len(requests)
            bar = _bar(len(requests), "generate", disable_tqdm)
            for key, indices in groups.items():
                kwargs = dict(requests[indices[0]].args[1])
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                do_sample = kwargs.get("do_sample", False)
                temperature = float(kwargs.get("temperature", 0.0)) if do_sample else 0.0
                texts = self.scorer.generate_until([requests[i].args[0] for i in indices], stop=until,
                                                   max_new_tokens=int(kwargs.get("max_gen_toks", 256)),
                                                   temperature=temperature, seed=kwargs.get("seed", 0),
                                                   progress=bar)
                for i, text in zip(indices, texts):
                    out[i] = text
            return out

    return RaylmLM(scorer)


def _bar(total: int, what: str, disable: bool):
    from tqdm import tqdm

    bar = tqdm(total=total, desc=what, unit="req", disable=disable or not sys.stderr.isatty())
    return bar.update


def run_harness(lm, tasks: list[str], *, include_path: str | None = None, num_fewshot: int | None = None,
                limit: int | None = None) -> dict:
    """lm-eval's `simple_evaluate` of `tasks` with `lm`; its results dict."""
    _lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise ConfigError(f"--include-path {include_path}: not a directory of lm-eval task YAMLs")
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"--harness {unknown[0]}: lm-eval knows no such task"
                          + ("" if include_path else " (tasks of your own: --include-path DIR)"))
    return simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                           log_samples=False, bootstrap_iters=0)


def harness_command(path: str, tasks: str, *, include_path: str | None = None, num_fewshot: int | None = None,
                    limit: int | None = None, batch_size: int = 8, device: str = "auto",
                    json_path: str | None = None, out=None) -> dict:
    """`raylm eval RUN --harness TASKS`: the tasks' metrics, printed as lm-eval's table and as --json."""
    _lm_eval()
    from lm_eval.utils import make_table

    from raylm import storage
    from raylm.use.generate import device_from_name
    from raylm.use.load import load_model, resolve_checkpoint
    from raylm.use.score import Scorer

    out = sys.stdout if out is None else out
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise ConfigError(f"--harness {tasks!r}: name at least one task")
    if limit is not None and limit < 1:
        raise ConfigError(f"--max-examples={limit}: must be at least 1")
    checkpoint = resolve_checkpoint(path)
    model, tokenizer, cfg = load_model(checkpoint, device_from_name(device), verified=True)
    scorer = Scorer(model, tokenizer, add_bos=cfg.data.add_bos, batch_size=batch_size, window=cfg.data.seq_len)
    results = run_harness(raylm_lm(scorer), names, include_path=include_path, num_fewshot=num_fewshot, limit=limit)
    print(f"raylm eval: {checkpoint}: lm-evaluation-harness", file=out)
    print(make_table(results), file=out)
    record = {"checkpoint": str(checkpoint), "tasks": names, "results": results["results"],
              "n-shot": results.get("n-shot"), "configs": results.get("configs")}
    if json_path:
        try:
            storage.write_bytes(storage.location(json_path),
                                (json.dumps(record, indent=1, default=str) + "\n").encode())
        except OSError as e:
            raise ConfigError(f"--json {json_path}: cannot write ({getattr(e, 'strerror', None) or e})") from None
    return record
