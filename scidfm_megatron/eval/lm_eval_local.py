"""Run lm-eval (EleutherAI lm-evaluation-harness 0.4.x) on a converted SciDFM checkpoint, offline.

The model is a Hugging Face folder (``MixtralForCausalLM`` weights + the SciDFM tokenizer, whose
``tokenizer_config.json`` maps ``AutoTokenizer`` to ``tokenization_scidfm.py``, hence
``trust_remote_code=True``). The task is ``scidfm_science_mc`` from ``examples/eval/lm_eval/``:
multiple-choice questions read from a local JSONL file ``{"question", "choices", "answer"}``, scored by
log-likelihood of ``" " + choice`` after ``"Question: <q>\\nAnswer:"`` (metrics ``acc`` and ``acc_norm``).

Nothing is downloaded: the Hugging Face offline switches are set before lm-eval, ``datasets`` or
``transformers`` are imported (and forced on in their already-imported config modules), and the task
file builds its dataset in memory from the JSONL file.

    python -m scidfm_megatron.cli.lm_eval_local --model DIR --data FILE.jsonl [--limit N]

See docs/lm_eval.md for the equivalent ``lm_eval --model hf ...`` command line.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

TASK = "scidfm_science_mc"
TASK_DIR_ENV = "SCIDFM_LM_EVAL_TASKS"
# examples/eval/lm_eval of the repository (the package is used from a source checkout / editable install)
DEFAULT_TASK_DIR = Path(__file__).resolve().parents[2] / "examples" / "eval" / "lm_eval"
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
_TRUE = {"1", "ON", "YES", "TRUE"}


def ensure_offline() -> None:
    """Turn on the Hugging Face offline switches unless the caller set them explicitly.

    huggingface_hub and datasets read these variables once, at import; if they were imported before
    this call (e.g. by ``import transformers``) their module constants are updated too.
    """
    for var in OFFLINE_VARS:
        os.environ.setdefault(var, "1")
    hub_off = os.environ["HF_HUB_OFFLINE"].upper() in _TRUE
    ds_off = os.environ["HF_DATASETS_OFFLINE"].upper() in _TRUE
    if "huggingface_hub.constants" in sys.modules and hub_off:
        hub: Any = sys.modules["huggingface_hub.constants"]  # the caller's import, not typed here
        hub.HF_HUB_OFFLINE = True
    if "datasets.config" in sys.modules and ds_off:
        cfg: Any = sys.modules["datasets.config"]
        cfg.HF_HUB_OFFLINE = cfg.HF_DATASETS_OFFLINE = True


def resolve_task_dir(task_dir: str | os.PathLike | None = None) -> Path:
    path = Path(task_dir or os.environ.get(TASK_DIR_ENV) or DEFAULT_TASK_DIR).expanduser().resolve()
    if not (path / f"{TASK}.yaml").is_file():
        raise FileNotFoundError(f"{path}/{TASK}.yaml not found (pass task_dir= / --task-dir or set {TASK_DIR_ENV})")
    return path


def run_lm_eval(model_dir: str, data_file: str | os.PathLike, limit: int | None = None, batch_size: int = 4,
                device: str = "cpu", *, dtype: str = "float32", task_dir: str | None = None) -> dict:
    """Evaluate ``model_dir`` on the local multiple-choice task over ``data_file``, offline.

    Returns ``{"task", "acc", "acc_norm", "n", "raw", "samples"}``: ``n`` is the number of questions
    scored (after ``limit``), ``raw`` lm-eval's results entry for the task (metrics and stderrs),
    ``samples`` one entry per question: ``doc_id``, ``answer`` and ``loglikelihoods`` (one per choice).
    """
    ensure_offline()
    model_dir = str(Path(model_dir).expanduser().resolve())
    data_file = Path(data_file).expanduser().resolve()
    if not (Path(model_dir) / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: not a Hugging Face model folder (no config.json)")
    if not data_file.is_file():
        raise FileNotFoundError(f"{data_file}: data file not found")
    tasks_path = resolve_task_dir(task_dir)

    import lm_eval
    from lm_eval.tasks import TaskManager

    # include_defaults=False: index only our task folder, not lm-eval's ~10k built-in YAMLs (faster).
    # The metadata reaches the task's custom_dataset loader (examples/eval/lm_eval/utils.py).
    manager = TaskManager(include_path=str(tasks_path), include_defaults=False,
                          metadata={"data_file": str(data_file)})
    out = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": model_dir, "trust_remote_code": True, "dtype": dtype},
        tasks=[TASK], task_manager=manager, limit=limit, batch_size=batch_size, device=device,
        log_samples=True)
    if out is None:  # non-zero rank of a distributed run
        return {}
    raw = out["results"][TASK]
    samples = [{"doc_id": s["doc_id"], "answer": s["target"],
                "loglikelihoods": [float(ll) for ll, _ in s["filtered_resps"]]}
               for s in sorted(out["samples"][TASK], key=lambda s: s["doc_id"])]
    return {"task": TASK, "acc": float(raw["acc,none"]), "acc_norm": float(raw["acc_norm,none"]),
            "n": int(out["n-samples"][TASK]["effective"]), "raw": raw, "samples": samples}
