"""Experiment trackers through Accelerate's own (TensorBoard, W&B, Trackio, MLflow, Comet ML, Aim,
ClearML, DVCLive), beside the run's metrics.jsonl, which is always written.

    names = tracker_names(cfg.report_to, cfg.tensorboard)   # before any model loads: a missing package is one line
    accelerator = Accelerator(log_with=names, project_dir=cfg.output_dir)
    trackers = Trackers(accelerator, cfg, names, resumed)     # init_trackers(project, config=the resolved config)
    trackers.log(metrics, step)                               # main process only; a step is sent once
    trackers.log_samples(step, rows)                          # a table where the tracker has one
    trackers.finish()                                         # the trackers' end_training

Resuming continues the same run: the run ids (W&B, MLflow, Trackio) are kept in
``OUTPUT_DIR/trackers.json`` and given back to the tracker, and TensorBoard writes to the same
folder (``OUTPUT_DIR/<project>``). A resumed run recomputes the steps the interrupted one made after
its checkpoint, with the same values (resume is exact), so those steps, already sent, are not sent
again: the file also records the last step each tracker received.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Sequence

from ampo_common.errors import InputError

# tracker name -> (the module it needs, what to install)
TRACKERS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", 'pip install -e ".[tensorboard]"'),
    "wandb": ("wandb", 'pip install -e ".[wandb]"'),
    "trackio": ("trackio", 'pip install -e ".[trackio]"'),
    "mlflow": ("mlflow", 'pip install -e ".[mlflow]"'),
    "comet_ml": ("comet_ml", "pip install comet_ml"),
    "aim": ("aim", "pip install aim"),
    "clearml": ("clearml", "pip install clearml"),
    "dvclive": ("dvclive", "pip install dvclive"),
}
STATE_FILE = "trackers.json"


def installed(name: str) -> bool:
    return importlib.util.find_spec(TRACKERS[name][0]) is not None


def tracker_names(report_to: str | Sequence[str] | None, tensorboard: bool | None = None) -> list[str]:
    """The trackers a run logs to. ``None`` (the default): TensorBoard when it is installed;
    ``"all"``: every installed one; ``"none"``: none. A tracker asked for by name whose package
    is missing is an InputError naming what to install."""
    if report_to is None:
        names = ["tensorboard"] if installed("tensorboard") else []
    elif report_to == "all":
        names = [name for name in TRACKERS if installed(name)]
    elif report_to == "none":
        names = []
    else:
        names = [report_to] if isinstance(report_to, str) else list(report_to)
        for name in names:
            if name not in TRACKERS:
                raise InputError("report_to", f"unknown tracker {name!r}; expected some of {', '.join(TRACKERS)}, "
                                 "all or none")
            if not installed(name):
                raise InputError("report_to", f"{name} is not installed: {TRACKERS[name][1]}")
    if tensorboard is False:  # the older switch, still honoured
        names = [name for name in names if name != "tensorboard"]
    return list(dict.fromkeys(names))


def flat_config(values: Any, prefix: str = "") -> dict[str, Any]:
    """The resolved config as flat ``a.b.c`` keys with scalar values (TensorBoard's hparams and
    MLflow's params take no nesting or lists)."""
    if isinstance(values, dict):
        out: dict[str, Any] = {}
        for key, value in values.items():
            out.update(flat_config(value, f"{prefix}{key}."))
        return out
    key = prefix[:-1]
    if values is None or isinstance(values, (bool, int, float, str)):
        return {key: "null" if values is None else values}
    return {key: json.dumps(values, default=str)}


class Trackers:
    """The run's trackers (every process builds it; only the main process logs)."""

    def __init__(self, accelerator, cfg, names: list[str], resumed_step: int | None):
        """``names``: ``tracker_names``' (the Accelerator was built with them); ``resumed_step``:
        the checkpoint's step when resuming (the trackers continue the interrupted run)."""
        self.accelerator = accelerator
        self.names = list(names)
        self.path = Path(cfg.output_dir) / STATE_FILE
        self.state = self._read_state() if resumed_step is not None else {}
        self.sent_through = self.state.get("last_step", 0)  # steps already with the trackers
        if not self.names:
            return
        run_name = cfg.run_name or Path(cfg.output_dir).name
        accelerator.init_trackers(cfg.project, config=flat_config(json.loads(cfg.model_dump_json())),
                                  init_kwargs=self._init_kwargs(run_name, Path(cfg.output_dir)))
        if accelerator.is_main_process:
            self.state["run_ids"] = {**self.state.get("run_ids", {}), **self._run_ids()}
            self._write_state()

    def _read_state(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def _write_state(self) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.state, indent=1))
        os.replace(tmp, self.path)

    def _init_kwargs(self, run_name: str, output_dir: Path) -> dict:
        ids = self.state.get("run_ids", {})
        kwargs = {
            "wandb": {"name": run_name, "dir": str(output_dir), "resume": "allow", **({"id": ids["wandb"]} if "wandb" in ids else {})},
            "mlflow": {"run_name": run_name, **({"run_id": ids["mlflow"]} if "mlflow" in ids else {})},
            "trackio": {"name": ids.get("trackio", run_name), "resume": "allow"},
        }
        return {name: value for name, value in kwargs.items() if name in self.names}

    def _run_ids(self) -> dict[str, str]:
        ids = {}
        for name in self.names:
            tracker = self.accelerator.get_tracker(name, unwrap=False)
            if name == "wandb":
                ids[name] = tracker.run.id
            elif name == "mlflow":
                ids[name] = tracker.active_run.info.run_id
            elif name == "trackio":
                ids[name] = getattr(tracker.run, "name", None) or ""
        return {k: v for k, v in ids.items() if v}

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """The step's numbers to every tracker, once: a step a resumed run recomputes and the
        interrupted run already sent is skipped."""
        if not self.names or not self.accelerator.is_main_process or step <= self.sent_through:
            return
        values = {k: v for k, v in metrics.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
        self.accelerator.log(values, step=step)
        self.sent_through = self.state["last_step"] = step
        self._write_state()

    def log_samples(self, step: int, columns: list[str], rows: list[list]) -> None:
        """Sampled completions as a table: W&B, Comet and Trackio tables, TensorBoard text and an
        MLflow artifact (markdown); other trackers get none (samples.jsonl has them all)."""
        if not self.names or not self.accelerator.is_main_process or step <= self.state.get("samples_through", 0):
            return
        for name in self.names:
            tracker = self.accelerator.get_tracker(name, unwrap=False)
            if name in ("wandb", "comet_ml") and hasattr(tracker, "log_table"):
                tracker.log_table("samples", columns=columns, data=rows, step=step)
            elif name == "trackio":
                import trackio

                tracker.log({"samples": trackio.Table(columns=columns, data=rows)}, step=step)
            elif name == "tensorboard":
                tracker.writer.add_text("samples", _markdown_table(columns, rows), global_step=step)
            elif name == "mlflow":
                import mlflow

                mlflow.log_text(_markdown_table(columns, rows), f"samples/step-{step:06d}.md")
        self.state["samples_through"] = step
        self._write_state()

    def finish(self) -> None:
        """Close every tracker (Accelerate's end_training, but the process group is left for
        ``distributed.shutdown`` to take down together, after a barrier)."""
        for tracker in self.accelerator.trackers:
            tracker.finish()


def _markdown_table(columns: list[str], rows: list[list]) -> str:
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
