"""Running the matrix: every cell trained through `Trainer` into an ordinary run directory, then
measured; finished cells skipped, unfinished ones resumed; one process per GPU when several exist.

A comparison directory:

    DIR/.latentformer.json     {"kind": "compare"} (fsutil.mark_output)
    DIR/compare.json           the plan: family, variants, seeds, tokens, overrides, data (`Plan`)
    DIR/cells/<variant>-s<k>/  run directories (config.yaml, checkpoints/, metrics.jsonl, tb/) + cell.json
    DIR/logs/<cell>.log        what the cell's training printed
    DIR/decode.json            decode speed of every variant, timed interleaved once all cells finished
    DIR/results.json, report.md, report.html, figures/   (report.py)

A cell's `cell.json` says how far it got: absent (train, or resume from its latest step
checkpoint), `"status": "trained"` (training finished; measure), `"status": "done"` (measured:
never touched again). Two processes never run one cell: each holds an flock on `cells/.<cell>.lock`.
Parallel workers are `python -m latentformer.compare.runner DIR CELL` with CUDA_VISIBLE_DEVICES set
to one GPU; they die with the parent (PR_SET_PDEATHSIG), so a killed comparison leaves no orphan
training a cell that the next invocation would resume.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from latentformer.compare.matrix import Cell, Family, Variant, cells as make_cells, check_matching, resolve_variants, steps_for_tokens
from latentformer.config import from_dict, to_dict
from latentformer.fsutil import atomic_write_text
from latentformer.procutil import die_with_parent
from latentformer.train.config import TrainConfig, load_run_config

PLAN = "compare.json"
CELLS = "cells"
LOGS = "logs"
CELL_STATE = "cell.json"
DECODE = "decode.json"
# compare trains every cell for the same number of tokens, step-exact and resumable
FIXED = {"train.max_time_minutes": 0, "train.early_stopping_patience": 0}
# the matrix display replaces the trainer's progress bar; cells print no sample
QUIET = {"train.progress": False, "train.sample_tokens": 0}


@dataclass
class Plan:
    """Everything that defines a comparison (saved as compare.json; a re-run without arguments reuses it)."""

    family: dict[str, Any]  # Family.to_dict()
    variants: list[str]
    seeds: int
    tokens: int  # training tokens per cell (a whole number of steps: steps x batch_tokens)
    overrides: dict[str, Any]  # dotted overrides of every cell given by the user (train.*, model.*, data.*)
    data_dir: str
    data_fingerprint: str
    vocab_size: int
    memory_gib: float
    decode_contexts: list[int]
    decode_batch_sizes: list[int]
    match: bool = True
    allow_mismatch: bool = False
    command: str = ""

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        return from_dict(cls, data)

    @property
    def family_obj(self) -> Family:
        return Family.from_dict(self.family)


@dataclass
class Matrix:
    plan: Plan
    family: Family
    variants: list[Variant]
    reference_params: int
    cells: list[Cell]
    mismatched: list[str] = field(default_factory=list)


def common_overrides(plan: Plan, family: Family) -> dict[str, Any]:
    """Dotted overrides of every cell: family recipe < derived schedule < the user's < the forced ones."""
    for key in FIXED:
        if key in plan.overrides:
            raise ValueError(f"--{key}: compare trains every cell for the same number of tokens; this field cannot be set")
    base = {f"train.{k}": v for k, v in family.train.items()}
    merged = {**base, **plan.overrides}
    batch_tokens = int(merged.get("train.batch_tokens", TrainConfig.batch_tokens))
    steps = steps_for_tokens(plan.tokens, batch_tokens)
    every = max(1, steps // family.evals)
    derived = {"train.max_steps": steps, "train.eval_interval": every,
               # step checkpoints by wall time (checkpoint_minutes), at the end and on SIGTERM/SIGINT:
               # a hard-killed cell loses at most checkpoint_minutes; no best/ weights (the study
               # reads the final weights, the curve gives the best loss)
               "train.checkpoint_interval": 0, "train.keep_last": 1, "train.save_best": False}
    return {**base, **derived, **plan.overrides, **FIXED, **QUIET, "data.dir": plan.data_dir}


def build(plan: Plan) -> Matrix:
    family = plan.family_obj
    common = common_overrides(plan, family)
    variants, ref = resolve_variants(family, plan.variants, common, plan.vocab_size, match=plan.match)
    mismatched = check_matching(variants)
    if mismatched and not plan.allow_mismatch:
        raise ValueError(f"parameter counts differ from the reference ({family.reference}, {ref:,}) by more than 2%: "
                         f"{', '.join(mismatched)}; pass --allow-mismatch to compare them anyway")
    return Matrix(plan, family, variants, ref, make_cells(variants, plan.seeds), mismatched)


# -- cell state -----------------------------------------------------------------------------------
def cell_dir(root: Path, cell: Cell) -> Path:
    return root / CELLS / cell.name


_NUM = (int, float)
_NUM_OR_NULL = (int, float, type(None))
# what the report and a resumed cell read from cell.json, by status: a type, a nested object (dict)
# or a list of such objects ([dict]). cell.json is written atomically, so a file that does not
# match was damaged or edited by hand: refused, never read as "not run yet".
STATE_FIELDS = {
    "trained": {"status": str},
    "done": {"status": str, "val": {"loss": _NUM, "perplexity": _NUM, "bpb": _NUM, "tokens": int},
             "train": {"tokens_per_s": _NUM_OR_NULL, "mfu": _NUM_OR_NULL, "seconds": _NUM},
             "curve": [{"tokens": int, "loss": _NUM, "bpb": _NUM}], "device": str, "finished": str},
}
LEGACY_DECODE = [{"mode": str, "batch_size": int, "context": int, "tokens_per_s": _NUM_OR_NULL}]
DECODE_FIELDS = {"settings": {"variants": [str], "contexts": [int], "batch_sizes": [int], "rounds": int}, "device": str,
                 "rows": [{"variant": str, "mode": str, "batch_size": int, "context": int}]}
_KIND_NAMES = {str: "a string", int: "an integer", _NUM: "a number", _NUM_OR_NULL: "a number or null",
               (list, type(None)): "a list or null"}


def _json_kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "true/false", type(None): "null"}.get(
        type(value), "a number")


def check_fields(value: Any, spec: Any, where: str) -> None:
    """ValueError naming the first field of `value` (JSON) that does not match `spec` (see STATE_FIELDS)."""
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be an object, got {_json_kind(value)}")
        for key, sub in spec.items():
            if key not in value:
                raise ValueError(f"{where}: field {key!r} is missing")
            check_fields(value[key], sub, f"{where}.{key}")
    elif isinstance(spec, list):
        if not isinstance(value, list):
            raise ValueError(f"{where} must be a list, got {_json_kind(value)}")
        for i, item in enumerate(value):
            check_fields(item, spec[0], f"{where}[{i}]")
    elif isinstance(value, bool) or not isinstance(value, spec):  # JSON true is no number
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise ValueError(f"{where} must be {_KIND_NAMES[spec]}, got {shown}")


def _read_json(path: Path, remedy: str) -> Any:
    """The JSON in `path`, None when there is no such file; ValueError naming it and `remedy` when
    it cannot be read or parsed."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path} is damaged ({e}): {remedy}") from None


def read_state(run_dir: Path) -> dict[str, Any] | None:
    """A cell's cell.json, None when it has none (not trained yet); ValueError naming the file and
    what is wrong when it is damaged."""
    path = run_dir / CELL_STATE
    state = _read_json(path, "restore it, or delete it to redo the cell")
    if state is None:
        return None
    status = state.get("status") if isinstance(state, dict) else None
    check_fields(state, STATE_FIELDS.get(status, {"status": str}), str(path))
    if status not in STATE_FIELDS:
        raise ValueError(f"{path}: field 'status' must be one of {', '.join(STATE_FIELDS)}, got {status!r}")
    if status == "done":  # optional: windows are absent from, and decode rows only in, cells finished before decode.json
        if "window_tokens_per_s" in state["train"]:
            check_fields(state["train"]["window_tokens_per_s"], [_NUM], f"{path}.train.window_tokens_per_s")
        if "decode" in state:
            check_fields(state["decode"], LEGACY_DECODE, f"{path}.decode")
    return state


def write_state(run_dir: Path, state: dict[str, Any]) -> None:
    atomic_write_text(run_dir / CELL_STATE, json.dumps(state, indent=1) + "\n")


def is_done(root: Path, cell: Cell) -> bool:
    state = read_state(cell_dir(root, cell))
    return state is not None and state.get("status") == "done"


# train fields that change when and what a cell saves or prints, never what it computes: cells
# may differ in them (fewer checkpoints for the remaining cells of a comparison, say)
BOOKKEEPING = frozenset({"checkpoint_interval", "checkpoint_minutes", "keep_last", "save_best", "log_interval", "progress",
                         "tensorboard"})


def check_existing(root: Path, matrix: Matrix) -> None:
    """A cell directory trained with another config is an error (never silently mixed in); the
    `BOOKKEEPING` train fields may differ. The saved config is read as a run's is, so a field added
    since it was written counts as its default (what the older code did: MTP off, AdamW)."""
    for cell in matrix.cells:
        saved = cell_dir(root, cell) / "config.yaml"
        if not saved.is_file():
            continue
        old, new = load_run_config(saved).to_dict(), cell.cfg.to_dict()
        for section in ("model", "train"):
            for key, value in new[section].items():
                if section == "train" and key in BOOKKEEPING:
                    continue
                if old.get(section, {}).get(key) != value:
                    raise ValueError(f"cell {cell.name} in {root} was trained with {section}.{key}="
                                     f"{old.get(section, {}).get(key)!r}, this comparison wants {value!r}: "
                                     "use the same settings, another --out, or --force to start over")


def latest_step(run_dir: Path) -> int:
    """Step of the newest step checkpoint with a train state (0 when there is none)."""
    from latentformer.checkpoint import TRAIN_STATE, step_dirs

    steps = [int(p.name[len("step_"):]) for p in step_dirs(run_dir) if (p / TRAIN_STATE).is_file()]
    return max(steps, default=0)


def progress_step(run_dir: Path) -> int:
    """The last step a cell logged (metrics.jsonl), for the progress display of worker processes."""
    try:
        with open(run_dir / "metrics.jsonl", "rb") as fh:
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - 4096))
            lines = fh.read().decode("utf-8", "replace").splitlines()
        return int(json.loads(lines[-1])["step"]) if lines else 0
    except (OSError, ValueError, KeyError, IndexError):
        return 0


@contextlib.contextmanager
def cell_lock(root: Path, cell: Cell):
    path = root / CELLS / f".{cell.name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"cell {cell.name} is being run by another process (lock {path})") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def run_cell(root: Path, matrix: Matrix, cell: Cell, on_step: Callable[[int], None] | None = None,
             on_phase: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train (or resume) and measure one cell; returns its final state (cell.json)."""
    from latentformer.compare.measure import measure_cell
    from latentformer.train.trainer import Trainer

    run_dir = cell_dir(root, cell)
    with cell_lock(root, cell):
        state = read_state(run_dir)
        if state is not None and state.get("status") == "done":
            return state
        hooks = [lambda trainer, step: on_step(step)] if on_step else []
        if state is None or state.get("status") != "trained":
            resume = latest_step(run_dir) > 0
            if not resume and run_dir.exists():  # started, never checkpointed: start again
                shutil.rmtree(run_dir)
            if on_phase:
                on_phase("training")
            trainer = Trainer(cell.cfg, run_dir, resume=resume, vocab_explicit=True, on_step=hooks)
            summary = trainer.fit()
            state = {"status": "trained", "cell": cell.name, "variant": cell.variant.name, "seed_index": cell.seed_index,
                     "seed": cell.cfg.train.seed, "train_summary": summary}
            write_state(run_dir, state)
        else:  # trained; the measurement was cut off
            trainer = Trainer(cell.cfg, run_dir, resume=True, vocab_explicit=True)
        if on_phase:
            on_phase("measuring")
        state = {**state, "status": "done", **measure_cell(trainer, run_dir)}
        write_state(run_dir, state)
    del trainer
    _release(cell.cfg.train.compile)
    return state


def _release(compiled: bool) -> None:
    """Between in-process cells: free the device memory of the last one, and forget its compiled
    graphs (past 8 compilations of one function dynamo silently runs it eagerly: NOTES.md)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if compiled:
        torch._dynamo.reset()


# -- the matrix -----------------------------------------------------------------------------------
def cuda_devices() -> list[str]:
    """Visible CUDA device ids (as CUDA_VISIBLE_DEVICES names them), [] without CUDA."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = [v.strip() for v in visible.split(",") if v.strip()] if visible else [str(i) for i in range(n)]
    return names[:n]


class MatrixProgress:
    """Which cell runs where, and the whole matrix's progress in steps with an ETA: a rich display
    on a terminal, plain lines otherwise (logs, CI)."""

    def __init__(self, console, matrix: Matrix, root: Path) -> None:
        self.console = console
        self.cells = matrix.cells
        self.total = sum(c.cfg.train.max_steps for c in self.cells)
        self.steps = {c.name: (c.cfg.train.max_steps if is_done(root, c) else latest_step(cell_dir(root, c))) for c in self.cells}
        self.start_steps = sum(self.steps.values())
        self.t0 = time.monotonic()
        self.finished = sum(is_done(root, c) for c in self.cells)
        self.bar = None
        if console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
                                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                console=console, redirect_stdout=False, redirect_stderr=False)
            self.task = self.bar.add_task("[bold]compare", total=self.total, completed=self.start_steps, info=self._cells_info())
            self.slots: dict[str, int] = {}
            self.bar.start()

    def _cells_info(self) -> str:
        return f"cells {self.finished}/{len(self.cells)}"

    def eta(self) -> str:
        done = sum(self.steps.values()) - self.start_steps
        if done <= 0:
            return "eta unknown"
        left = (self.total - sum(self.steps.values())) * (time.monotonic() - self.t0) / done
        return f"eta {left / 60:.1f} min"

    def start(self, cell: Cell, where: str) -> None:
        i = self.cells.index(cell) + 1
        if self.bar is not None:
            self.slots[cell.name] = self.bar.add_task(f"  {where} {cell.name}", total=cell.cfg.train.max_steps,
                                                      completed=self.steps[cell.name], info="")
        else:
            self.console.print(f"[{i}/{len(self.cells)}] {cell.name} on {where}: {cell.cfg.train.max_steps} steps "
                               f"({cell.variant.name}, seed {cell.cfg.train.seed}); {self.eta()}", highlight=False)

    def phase(self, cell: Cell, phase: str) -> None:
        if self.bar is not None and cell.name in self.slots:
            self.bar.update(self.slots[cell.name], info=phase)
        elif self.bar is None and phase == "measuring":
            self.console.print(f"    {cell.name}: measuring", highlight=False)

    def step(self, cell: Cell, step: int) -> None:
        self.steps[cell.name] = max(self.steps[cell.name], step)
        if self.bar is not None:
            self.bar.update(self.task, completed=sum(self.steps.values()))
            if cell.name in self.slots:
                self.bar.update(self.slots[cell.name], completed=self.steps[cell.name])

    def finish(self, cell: Cell, state: dict[str, Any] | None, error: str | None, seconds: float) -> None:
        if state is not None:
            self.finished += 1
            self.step(cell, cell.cfg.train.max_steps)
        if self.bar is not None:
            self.bar.remove_task(self.slots.pop(cell.name))
            self.bar.update(self.task, info=self._cells_info())
        if error is not None:
            self.console.print(f"{cell.name}: failed: {error}", highlight=False, soft_wrap=True)
        else:
            val = state["val"]
            self.console.print(f"{cell.name}: done in {seconds:.0f} s: val loss {val['loss']:.4f}, {val['bpb']:.4f} bits/byte "
                               f"({self._cells_info()}; {self.eta()})", highlight=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _log_path(root: Path, cell: Cell) -> Path:
    path = root / LOGS / f"{cell.name}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _in_process(root: Path, matrix: Matrix, todo: list[Cell], progress: MatrixProgress) -> list[str]:
    failed = []
    for cell in todo:
        progress.start(cell, "this process")
        t0 = time.monotonic()
        with open(_log_path(root, cell), "a", encoding="utf-8") as log:
            try:
                # the trainer's lines go to the cell's log; the matrix display keeps the terminal
                with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                    state = run_cell(root, matrix, cell, on_step=lambda s, c=cell: progress.step(c, s),
                                     on_phase=lambda p, c=cell: progress.phase(c, p))
            except Exception as e:  # one cell's failure must not lose the others
                traceback.print_exc(file=log)
                failed.append(cell.name)
                progress.finish(cell, None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} (log: {log.name})",
                                time.monotonic() - t0)
                continue
        progress.finish(cell, state, None, time.monotonic() - t0)
    return failed


def _workers(root: Path, todo: list[Cell], devices: list[str], progress: MatrixProgress) -> list[str]:
    """One `python -m latentformer.compare.runner` per GPU, each pulling the next pending cell."""
    failed, queue, running = [], list(todo), {}  # running: device -> (cell, Popen, log file, t0)
    env = {**os.environ, "LATENTFORMER_COMPARE_PARENT": str(os.getpid())}

    def stop(signum, frame):  # SIGTERM (a timeout, a scheduler) ends the matrix like Ctrl-C
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        while queue or running:
            for dev in devices:
                if dev not in running and queue:
                    cell = queue.pop(0)
                    log = open(_log_path(root, cell), "a", encoding="utf-8")
                    proc = subprocess.Popen([sys.executable, "-m", "latentformer.compare.runner", str(root), cell.name],
                                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env={**env, "CUDA_VISIBLE_DEVICES": dev})
                    running[dev] = (cell, proc, log, time.monotonic())
                    progress.start(cell, f"gpu {dev}")
            time.sleep(1.0)
            for dev, (cell, proc, log, t0) in list(running.items()):
                run_dir = cell_dir(root, cell)
                progress.step(cell, progress_step(run_dir))
                state = read_state(run_dir)
                if state is not None and state.get("status") == "trained":
                    progress.phase(cell, "measuring")
                if proc.poll() is None:
                    continue
                log.close()
                del running[dev]
                state = read_state(run_dir)
                if proc.returncode == 0 and state is not None and state.get("status") == "done":
                    progress.finish(cell, state, None, time.monotonic() - t0)
                else:
                    failed.append(cell.name)
                    progress.finish(cell, None, f"exit status {proc.returncode} (log: {log.name})", time.monotonic() - t0)
    finally:
        # a worker's trainer saves a checkpoint at its step boundary on SIGTERM, then exits
        for cell, proc, log, _ in running.values():
            proc.terminate()
        for cell, proc, log, _ in running.values():
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
        signal.signal(signal.SIGTERM, previous)
    return failed


# -- decode speed, all variants at once ----------------------------------------------------------
def decode_settings(matrix: Matrix) -> dict[str, Any]:
    """What decode.json was measured for: the variants (architectures, not trained cells: see
    compare/measure.py) and the grid."""
    from latentformer.compare.measure import DECODE_ROUNDS

    return {"variants": [v.name for v in matrix.variants], "contexts": matrix.plan.decode_contexts,
            "batch_sizes": matrix.plan.decode_batch_sizes, "rounds": DECODE_ROUNDS}


def read_decode(root: Path) -> dict[str, Any] | None:
    """decode.json, None when absent; ValueError naming it when damaged (as `read_state`)."""
    path = root / DECODE
    data = _read_json(path, "delete it to measure decode speed again")
    if data is None:
        return None
    check_fields(data, DECODE_FIELDS, str(path))
    for i, row in enumerate(data["rows"]):
        check_fields(row["tokens_per_s"], (list, type(None)), f"{path}.rows[{i}].tokens_per_s")
        for j, v in enumerate(row["tokens_per_s"] or []):
            check_fields(v, _NUM, f"{path}.rows[{i}].tokens_per_s[{j}]")
    return data


def measure_decode(root: Path, matrix: Matrix, console) -> None:
    """Time decoding of every variant, interleaved (`decode_samples`), into decode.json; kept while
    the variants and the grid stay the same."""
    import torch

    from latentformer.compare.measure import decode_samples, device_name
    from latentformer.train.distributed import best_device

    settings = decode_settings(matrix)
    old = read_decode(root)
    if old is not None and old["settings"] == settings:
        return
    wanted = matrix.cells[0].cfg.train.device
    device = torch.device(best_device() if wanted == "auto" else wanted)
    console.print(f"compare: decode speed of {', '.join(settings['variants'])}, {settings['rounds']} interleaved rounds",
                  highlight=False, soft_wrap=True)
    configs = {c.variant.name: c.cfg.model for c in matrix.cells if c.seed_index == 0}
    rows = decode_samples(configs, settings["contexts"], settings["batch_sizes"], device, settings["rounds"])
    data = {"settings": settings, "device": device_name(device), "rows": rows}
    atomic_write_text(root / DECODE, json.dumps(data, indent=1) + "\n")
    _release(False)


def run_matrix(root: Path, matrix: Matrix, console, gpus: int | None = None) -> list[str]:
    """Run every unfinished cell, then time decoding; returns the names of the cells that failed."""
    todo = [c for c in matrix.cells if not is_done(root, c)]
    devices = cuda_devices() if matrix.cells and matrix.cells[0].cfg.train.device in ("auto", "cuda") else []
    if gpus is not None:
        devices = devices[:gpus]
    progress = MatrixProgress(console, matrix, root)
    try:
        if len(devices) > 1 and len(todo) > 1:
            failed = _workers(root, todo, devices, progress)
        else:
            failed = _in_process(root, matrix, todo, progress)
    finally:
        progress.close()
    measure_decode(root, matrix, console)
    return failed


def load_plan(root: Path) -> Plan | None:
    """The plan in `root`, None when there is none; ValueError naming compare.json and what is
    wrong when it is damaged or edited into something that is no plan."""
    path = root / PLAN
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path} is corrupt: {e}") from None
    try:
        plan = Plan.from_dict(data)
        Family.from_dict(plan.family)  # build() reads the family: it must parse as well
    except (ValueError, TypeError, AttributeError) as e:  # from_dict names the field; a family's nested parts may not
        raise ValueError(f"{path}: {str(e).splitlines()[0]}") from None
    return plan


def save_plan(root: Path, plan: Plan) -> None:
    atomic_write_text(root / PLAN, json.dumps(plan.to_dict(), indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    """Worker entry point: `python -m latentformer.compare.runner DIR CELL` runs one cell of DIR's plan."""
    die_with_parent(int(os.environ.get("LATENTFORMER_COMPARE_PARENT", "0")))  # a killed comparison leaves no orphan
    root, name = (argv if argv is not None else sys.argv[1:])[:2]
    root = Path(root)
    plan = load_plan(root)
    if plan is None:
        print(f"{root} has no {PLAN}", file=sys.stderr)
        return 2
    matrix = build(plan)
    cell = next((c for c in matrix.cells if c.name == name), None)
    if cell is None:
        print(f"{root}: no cell {name}", file=sys.stderr)
        return 2
    run_cell(root, matrix, cell)
    return 0


if __name__ == "__main__":
    sys.exit(main())
