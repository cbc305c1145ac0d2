"""``opd experiment regimes``: where on-policy distillation pays against SFT, one knob at a time, with an exact
teacher (``opd.regimes``: its distribution is known after any prefix, the student's own included).

A sweep point is a task (and for ``capacity`` a student width). Each seed's student is first taught the
sweep's basic skill (``base_steps`` of SFT on the teacher's samples of chains of every length the sweep uses,
fatal arm, or of walks at the highest entropy: a state looked up in the prompt's table, a step of a walk in
its graph), as a pretrained model would know it; a student of the default size does not learn it within
a sweep's budget otherwise. At each point and seed, one SFT warm start from that base (``warm_steps`` on the
point's teacher samples) is shared by every arm; from it:

- ``opd``: on-policy distillation from the exact teacher (``teacher=opd.regimes.exact:Exact``, the exact
  reverse KL over the vocabulary, ``kl=full``), ``prompts`` prompts x ``samples`` samples a step;
- ``sft-fresh``: SFT on new teacher samples every step, as many rows a step as ``opd`` (sample-fair);
- ``sft-fixed``: SFT on one dataset of ``fixed_pairs`` teacher samples, reused (compute-fair);
- ``rl`` (``horizon``'s recoverable arm): the task's exact reward, group-centred, as many rows as ``opd``;
- ``dart`` (``noise``): SFT on new teacher samples made under the same injected errors as the student's
  rollouts (``sample_noise``), the loss on the teacher's own characters only (Laskey et al. 2017, DART): it
  sees recovery states as ``opd`` does, off-policy. In the noise sweep every arm samples and is evaluated
  under the point's noise; ``sft-fresh`` and ``sft-fixed`` train on clean teacher samples.

Each method runs at its best learning rate of ``lrs``, chosen once per sweep at the middle knob value
(seed 0, final held-out greedy accuracy). FLOPs: the student's as ``opd train`` counts them; the teacher's
at a nominal size (``scales``: 1, 4, 16 times the student's per-token forward cost), for ``opd`` its
scoring of every row, for SFT its writing of every pair it trains on (``sft-fixed``: the dataset, once,
up front), for ``rl`` none. The warm start's compute is the same for every arm and left out.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from opd.errors import OpdError
from opd.experiments import finished, run_config, run_once

SWEEPS = {
    "horizon": ("hops", (4, 8, 16, 32)),
    "entropy": ("tau", (0.0, 0.3, 1.0, float("inf"))),
    "capacity": ("width", (16, 32, 64, 128)),
    "reuse": ("train_prompts", (1, 16, 0)),
    "noise": ("sample_noise", (0.0, 0.02, 0.05, 0.1)),
}
NOISE_HOPS = 8  # the noise sweep's chain: the recoverable arm at a middle horizon
# the base's SFT steps: a 2 x 128 student learns the chains' lookup in a sharp transition between about 250 and 500
# steps (bench/results/regimes/calibration.md), so 300 leaves it inside, below the ceiling; the walks take longer
BASE_STEPS = {"horizon": 300, "capacity": 300, "noise": 300, "entropy": 600, "reuse": 600}
TEACHER = "opd.regimes.exact:Exact"
CHAIN_STATES = 8
PATH_LENGTH = 5


@dataclass
class RegimesPlan:
    out: Path
    sweep: str = "horizon"
    seeds: int = 3
    knobs: tuple = ()  # () : the sweep's own values
    steps: int = 150
    warm_steps: int = 30
    base_steps: int | None = None  # None: the sweep's own (BASE_STEPS)
    base_lr: float = 1e-3
    eval_every: int = 10
    eval_examples: int = 256
    prompts: int = 16
    samples: int = 4
    fixed_pairs: int = 256
    lrs: tuple = (1e-4, 3e-4, 1e-3)
    width: int = 128
    layers: int = 2
    overrides: list = field(default_factory=list)
    report_only: bool = False  # train nothing: report the runs finished so far

    def __post_init__(self) -> None:
        if self.base_steps is None:
            self.base_steps = BASE_STEPS.get(self.sweep, 300)

    def values(self) -> tuple:
        if self.sweep not in SWEEPS:
            raise OpdError(f"--sweep {self.sweep!r} must be one of {', '.join(SWEEPS)}")
        return tuple(self.knobs) or SWEEPS[self.sweep][1]


@dataclass(frozen=True)
class Point:
    """One sweep point: its task, the student's width, the prompts a run may train on, and its methods."""

    name: str
    task: str
    width: int
    train_prompts: int = 0
    methods: tuple = ("opd", "sft-fresh", "sft-fixed")
    noise: float = 0.0  # sample_noise of every arm (rollouts and evaluation)
    max_new_tokens: int = 48  # room for the answer and its corrections, so that no arm is cut short


def points(plan: RegimesPlan) -> list[Point]:
    out = []
    for value in plan.values():
        value = value if plan.sweep in ("entropy", "noise") else int(value)
        if plan.sweep == "horizon":
            for arm in ("fatal", "recoverable"):
                methods = ("opd", "sft-fresh", "sft-fixed") + (("rl",) if arm == "recoverable" else ())
                out.append(Point(f"{arm}-k{value}", f"chain:{value}:{arm}:{CHAIN_STATES}", plan.width,
                                 methods=methods, max_new_tokens=3 * value + 8))
        elif plan.sweep == "entropy":
            out.append(Point(f"tau{value:g}", f"paths:{PATH_LENGTH}:{value:g}", plan.width))
        elif plan.sweep == "noise":
            out.append(Point(f"noise{value:g}", f"chain:{NOISE_HOPS}:recoverable:{CHAIN_STATES}", plan.width,
                             methods=("opd", "sft-fresh", "sft-fixed", "dart"), noise=float(value),
                             max_new_tokens=3 * NOISE_HOPS + 8))
        elif plan.sweep == "capacity":
            out.append(Point(f"width{value}", f"chain:8:recoverable:{CHAIN_STATES}", int(value)))
        else:
            out.append(Point(f"prompts{value or 'all'}", f"paths:{PATH_LENGTH}:inf", plan.width, int(value)))
    return out


def teacher_pairs(task_spec: str, count: int, seed: int, prompts: int = 0, run_seed: int = 0,
                  noise: float = 0.0) -> list[dict]:
    """``count`` prompts of the training split (``seed``'s stream) with a completion sampled from the exact
    teacher: SFT's data. With ``prompts`` (the reuse sweep): the first ``prompts`` prompts of ``run_seed``'s
    stream again and again, the ones ``train_prompts`` gives the sampled arms of that seed. With ``noise``
    (DART): sampled under injected errors, the replaced characters ``untrained``."""
    from opd.regimes.exact import noisy_completion, reference_completion
    from opd.tasks.choose import regime_task

    task = regime_task(task_spec)
    rng = random.Random(f"pairs/{seed}")
    if prompts:
        pool = task.train_examples(0, prompts, run_seed)
        examples = [pool[i % len(pool)] for i in range(count)]
    else:
        examples, step = [], 0
        while len(examples) < count:
            examples += task.train_examples(step, min(256, count - len(examples)), seed)
            step += 1
    if noise:
        return [{"prompt": ex.messages[-1]["content"], "completion": text, "untrained": [list(s) for s in spans]}
                for ex in examples for text, spans in [noisy_completion(task, ex, rng, noise)]]
    return [{"prompt": ex.messages[-1]["content"], "completion": reference_completion(task, ex, rng)}
            for ex in examples]


def write_pairs(path: Path, rows: list[dict]) -> Path:
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
        tmp.replace(path)
    return path


def student_dir(plan: RegimesPlan, width: int, seed: int) -> Path:
    """A fresh character-level student (``opd.zoo.make_model``: ``layers`` layers of ``width``), one per
    width and seed, shared by the sweep's points."""
    from opd.models import save_model
    from opd.regimes.vocab import char_tokenizer
    from opd.zoo import make_model

    path = plan.out / "models" / f"w{width}-s{seed}"
    if not (path / "config.json").is_file():
        tokenizer = char_tokenizer()
        save_model(make_model(tokenizer, layers=plan.layers, width=width, seed=1000 + seed), tokenizer, path)
    return path


def common(plan: RegimesPlan, point: Point, seed: int) -> dict:
    return dict(task=point.task, teacher=TEACHER, seed=seed, prompts_per_step=plan.prompts,
                max_new_tokens=point.max_new_tokens,
                eval_examples=plan.eval_examples, eval_samples=0, eval_every=plan.eval_every, warmup_steps=5,
                save_every=max(plan.eval_every, 50), lr_schedule="constant", sample_noise=point.noise)


def run_arm(plan: RegimesPlan, point: Point, seed: int, method: str, lr: float, warm: Path, progress: bool,
            where: Path) -> list[dict]:
    """One arm from the warm start: its metrics (a finished run reused, an interrupted one resumed)."""
    values = common(plan, point, seed) | dict(student=warm, lr=lr, steps=plan.steps)
    rows = plan.prompts * plan.samples
    if method == "opd":
        values |= dict(method="opd", samples_per_prompt=plan.samples, kl="full",
                       train_prompts=point.train_prompts)
    elif method == "rl":
        values |= dict(method="rl", samples_per_prompt=plan.samples, kl="sampled",
                       train_prompts=point.train_prompts)
    else:
        fresh = method in ("sft-fresh", "dart")
        count = rows * plan.steps if fresh else plan.fixed_pairs
        stream = 7919 * seed + (1 if fresh else 2) + (2 if method == "dart" else 0)
        data = write_pairs(plan.out / "data" / f"{point.name}-s{seed}-{method}.jsonl",
                           teacher_pairs(point.task, count, stream, point.train_prompts, seed,
                                         point.noise if method == "dart" else 0.0))
        values |= dict(method="sft", sft_data=data, prompts_per_step=rows, kl="sampled")
    config = run_config(plan.overrides, where, **values)
    return run_once(config, progress, desc=f"{point.name} {method} s{seed} lr={lr:g}")


def base_tasks(plan: RegimesPlan) -> list[str]:
    """The tasks that teach the sweep's basic skill, in equal shares: chains of every length the sweep uses
    (the lookup at every position; one length alone does not carry to longer chains), or walks at the
    highest entropy."""
    if plan.sweep in ("entropy", "reuse"):
        return [f"paths:{PATH_LENGTH}:inf"]
    if plan.sweep == "noise":
        return [f"chain:{NOISE_HOPS}:fatal:{CHAIN_STATES}"]
    hops = plan.values() if plan.sweep == "horizon" else (8,)
    return [f"chain:{int(k)}:fatal:{CHAIN_STATES}" for k in hops]


def base(plan: RegimesPlan, width: int, seed: int, progress: bool) -> Path:
    """A fresh student taught the sweep's basic skill: ``base_steps`` of SFT on teacher samples of
    ``base_tasks`` (one per width and seed, shared by the sweep's points; none with ``base_steps=0``)."""
    if not plan.base_steps:
        return student_dir(plan, width, seed)
    where = plan.out / "runs" / "base" / f"w{width}-s{seed}"
    rows = plan.prompts * plan.samples
    tasks = base_tasks(plan)
    share = -(-rows * plan.base_steps // len(tasks))
    pairs = [pair for i, task in enumerate(tasks) for pair in teacher_pairs(task, share, 31337 + 101 * seed + i)]
    random.Random(f"base/{seed}").shuffle(pairs)
    data = write_pairs(plan.out / "data" / f"base-w{width}-s{seed}.jsonl", pairs)
    hops = max(int(task.split(":")[1]) for task in tasks)
    point = Point("base", tasks[-1], width, max_new_tokens=3 * hops + 8)  # noiseless
    values = common(plan, point, seed) | dict(student=student_dir(plan, width, seed), method="sft", sft_data=data,
                                              prompts_per_step=rows, lr=plan.base_lr, steps=plan.base_steps,
                                              kl="sampled", eval_every=max(plan.base_steps // 4, 1))
    run_once(run_config(plan.overrides, where, **values), progress, desc=f"base w{width} s{seed}")
    return where / "final"


def warm_start(plan: RegimesPlan, point: Point, seed: int, progress: bool) -> Path:
    """SFT from a fresh student on the teacher's samples: the start every arm of (point, seed) shares."""
    where = plan.out / "runs" / point.name / f"s{seed}" / "warm"
    start = base(plan, point.width, seed, progress)
    if not plan.warm_steps:
        return start
    rows = plan.prompts * plan.samples
    data = write_pairs(plan.out / "data" / f"{point.name}-s{seed}-warm.jsonl",
                       teacher_pairs(point.task, rows * plan.warm_steps, 7919 * seed))
    values = common(plan, point, seed) | dict(student=start, method="sft", sft_data=data, prompts_per_step=rows,
                                              lr=plan.base_lr, steps=plan.warm_steps, kl="sampled",
                                              eval_every=plan.warm_steps)
    run_once(run_config(plan.overrides, where, **values), progress, desc=f"{point.name} warm s{seed}")
    return where / "final"


def rate_score(records: list[dict]) -> tuple[float, float]:
    """How a learning rate ranks: its final held-out accuracy (to 1 point), then the mean of its evaluations
    (the area under its curve: of two rates that end equal, the one that gets there sooner, which is what
    compute to a target measures)."""
    scored = [r["accuracy"] for r in records if r.get("accuracy") is not None]
    return (round(scored[-1], 2), sum(scored) / len(scored)) if scored else (0.0, 0.0)


def choose_rates(plan: RegimesPlan, progress: bool) -> dict[str, float]:
    """Each method's learning rate: the best of ``lrs`` at the middle knob value (seed 0; the horizon sweep:
    its recoverable arm) by ``rate_score`` (final held-out accuracy, then the area under the curve), kept in
    ``rates.json``."""
    path = plan.out / "rates.json"
    if path.is_file():
        return json.loads(path.read_text())
    if len(plan.lrs) == 1:  # nothing to choose
        chosen = dict.fromkeys(("opd", "sft-fresh", "sft-fixed", "rl", "dart"), plan.lrs[0])
        path.write_text(json.dumps(chosen, indent=2))
        return chosen
    candidates = points(plan)
    middle = [p for p in candidates if "fatal" not in p.name][len(plan.values()) // 2]
    warm = warm_start(plan, middle, 0, progress)
    chosen, table = {}, {}
    for method in middle.methods:
        results = {}
        for lr in plan.lrs:
            where = plan.out / "runs" / "rates" / f"{method}-lr{lr:g}"
            results[lr] = rate_score(run_arm(plan, middle, 0, method, lr, warm, progress, where))
        chosen[method] = max(results, key=lambda lr: (results[lr], -lr))
        table[method] = {f"{lr:g}": {"final": score[0], "mean": round(score[1], 4)} for lr, score in results.items()}
    path.write_text(json.dumps(chosen | {"at": middle.name, "accuracy": table}, indent=2))
    return chosen


def run_regimes(plan: RegimesPlan, progress: bool = True) -> dict:
    """Every point, seed and method of the sweep, then its table, plot and report (``regimes_report``)."""
    from opd.experiments.regimes_report import report

    started = time.perf_counter()
    if plan.report_only:
        return report_finished(plan, started)
    plan.out.mkdir(parents=True, exist_ok=True)
    rates = choose_rates(plan, progress)
    results: dict = {}
    # seed by seed, every point of a seed before the next seed's: a sweep stopped part way has the whole map at
    # fewer seeds (``--report-only``), not a part of it at every seed
    for seed, point in ((seed, point) for seed in range(plan.seeds) for point in points(plan)):
        warm = warm_start(plan, point, seed, progress)
        for method in point.methods:
            where = plan.out / "runs" / point.name / f"s{seed}" / method
            records = run_arm(plan, point, seed, method, rates[method], warm, progress, where)
            results.setdefault(point.name, {}).setdefault(method, []).append(arm_result(plan, point, seed, method,
                                                                                        records))
    summary = report(plan, points(plan), results, rates)
    summary["wall_seconds"] = time.perf_counter() - started
    (plan.out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def arm_result(plan: RegimesPlan, point: Point, seed: int, method: str, records: list[dict]) -> dict:
    where = plan.out / "runs" / point.name / f"s{seed}" / method
    return {"seed": seed, "records": records, "data": data_lengths(plan, point, seed, method),
            "diversity": diversity(where, point) if point.task.startswith("paths:") else None}


def report_finished(plan: RegimesPlan, started: float) -> dict:
    """``--report-only``: the report of the runs finished so far, training nothing: each point with the seeds
    whose every method has finished (a point with none is left out and named in the summary as pending)."""
    from opd.experiments.regimes_report import report
    from opd.runs import read_metrics

    path = plan.out / "rates.json"
    if not path.is_file():
        raise OpdError(f"{plan.out}: no rates.json yet (the sweep has not chosen its learning rates): nothing to "
                       "report")
    rates = json.loads(path.read_text())
    done, results, pending = [], {}, []
    for point in points(plan):
        seeds = [seed for seed in range(plan.seeds)
                 if all(finished(plan.out / "runs" / point.name / f"s{seed}" / m, plan.steps) for m in point.methods)]
        if not seeds:
            pending.append(point.name)
            continue
        done.append(point)
        for seed in seeds:
            for method in point.methods:
                records = read_metrics(plan.out / "runs" / point.name / f"s{seed}" / method)
                results.setdefault(point.name, {}).setdefault(method, []).append(arm_result(plan, point, seed,
                                                                                            method, records))
    if not done:
        raise OpdError(f"{plan.out}: no point has a seed with every method finished yet (pending: "
                       f"{', '.join(pending)})")
    summary = report(plan, done, results, {k: v for k, v in rates.items() if k not in ("at", "accuracy")})
    summary |= {"pending": pending, "seeds_done": {name: len(runs["opd"]) for name, runs in results.items()},
                "wall_seconds": time.perf_counter() - started}
    (plan.out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


DIVERSITY_PROMPTS, DIVERSITY_SAMPLES = 64, 8


def diversity(run_dir: Path, point: Point) -> float:
    """Path diversity of a run's final student (``PathsTask.path_diversity``: distinct valid walks per valid
    answer) over ``DIVERSITY_SAMPLES`` samples at temperature 1 of each of the first ``DIVERSITY_PROMPTS``
    held-out prompts, averaged; cached in the run's directory. Reverse KL is mode-seeking: this is what it
    costs in diversity."""
    cache = run_dir / "diversity.json"
    if cache.is_file():
        return json.loads(cache.read_text())["diversity"]
    import torch

    from opd.evaluation import completions_text
    from opd.models import chat_prompt_ids, load_model, load_tokenizer
    from opd.samplers.local import sample_in_batches
    from opd.tasks.choose import regime_task

    task = regime_task(point.task)
    model = load_model(run_dir / "final", torch.device("cpu"), torch.float32).eval()
    tokenizer = load_tokenizer(run_dir / "final")
    examples = task.eval_examples(DIVERSITY_PROMPTS)
    drawn = sample_in_batches(model, [chat_prompt_ids(tokenizer, ex.messages) for ex in examples], rows=0,
                              samples_per_prompt=DIVERSITY_SAMPLES, max_new_tokens=point.max_new_tokens,
                              temperature=1.0, top_p=1.0, eos_id=tokenizer.eos_token_id,
                              pad_id=tokenizer.pad_token_id, vocab_size=len(tokenizer),
                              generator=torch.Generator().manual_seed(0))
    texts = completions_text(tokenizer, drawn.completion_ids())
    values = [task.path_diversity(texts[i * DIVERSITY_SAMPLES:(i + 1) * DIVERSITY_SAMPLES], ex)
              for i, ex in enumerate(examples)]
    value = sum(values) / len(values)
    cache.write_text(json.dumps({"diversity": value, "prompts": len(values), "samples": DIVERSITY_SAMPLES}))
    return value


def data_lengths(plan: RegimesPlan, point: Point, seed: int, method: str) -> list[tuple[int, int]] | None:
    """The (prompt, completion) lengths in tokens of an SFT arm's pairs (one character a token, the chat
    template's tokens added), for the teacher's cost of writing them; None for the sampled arms."""
    if not method.startswith("sft") and method != "dart":
        return None
    from opd.models import chat_prompt_ids
    from opd.regimes.vocab import char_tokenizer

    tokenizer = char_tokenizer()
    out = []
    for line in (plan.out / "data" / f"{point.name}-s{seed}-{method}.jsonl").read_text().splitlines():
        row = json.loads(line)
        out.append((len(chat_prompt_ids(tokenizer, [{"role": "user", "content": row["prompt"]}])),
                    len(row["completion"]) + 1))
    return out
