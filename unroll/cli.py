"""``unroll build | explain | convert | bench | train | eval | generate | construct | measure | features | attention``: the command line.

It behaves like a Unix tool: a usage mistake prints the usage and exits 2, a mistake in the input
(a recipe, a checkpoint, an image, an output folder) prints ``error: <where>: <what>`` and exits 2,
Ctrl-C exits 130; no traceback reaches the user unless `unroll` itself has a bug. It relies only
on what typer provides (typer bundles its own click, so ``import click`` is not ours to make).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from unroll.errors import UnrollError, excerpt, located, note
from unroll.files import output_folder
from unroll.network import LANGUAGE_TASKS

#: plain help and usage text: rich markup would swallow the `[default: ...]` brackets
app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Derive white-box networks from their objectives.")
console = Console()


def _check_overrides(values: Optional[list[str]]) -> list[str]:
    from unroll.recipe.load import split_override

    for value in values or []:
        try:
            split_override(value)
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
    return values or []


def _version(value: bool) -> None:
    if value:
        from unroll import __version__

        print(f"unroll {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="print the version and exit")] = False,
) -> None:
    """Derive white-box networks from their objectives."""


RecipeArg = Annotated[Path, typer.Argument(help="recipe YAML file", metavar="RECIPE", show_default=False)]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", metavar="KEY=VALUE", callback=_check_overrides,
                                                     help="override a recipe field: key.sub=value (repeatable)")]
DataOpt = Annotated[Optional[str], typer.Option(help="digits, mixtures, an ImageFolder DIR (with train/ and val/, or split "
                                                     "here), or cifar10:DIR / cifar100:DIR", show_default="the recipe's training.data")]
WorkersOpt = Annotated[Optional[int], typer.Option(help="loader worker processes", min=0, max=256,
                                                   show_default="0 for digits and mixtures, else min(8, cores)")]
PrecisionOpt = Annotated[Optional[str], typer.Option(help="bfloat16 (autocast) or float32", show_default="bfloat16 on a GPU, else float32")]
DeviceOpt = Annotated[Optional[str], typer.Option(help="cpu or cuda", show_default="cuda if available")]
RunOpt = Annotated[Path, typer.Option("--checkpoint", help="a run folder of unroll train (its weights and tokenizer.json), "
                                                          "or a weights file", show_default=False)]
MaxMemory = Annotated[float, typer.Option("--max-memory", metavar="GIB", min=0.001,
                                          help="refuse a build whose estimated memory exceeds this")]


def _within_budget(recipe: Path, overrides: list[str], max_memory: float, batch: int | None = 1,
                   training: bool = False, optimize: bool = True, measuring: bool = False, images: str | None = None):
    """(the resolved recipe, its network), once the memory estimate of what the command will run
    (``batch`` images; None: the recipe's training batch) is within ``--max-memory``: nothing
    large is allocated before this."""
    from unroll.lower.budget import check_budget
    from unroll.recipe import load_recipe, to_network

    resolved = load_recipe(recipe, overrides)
    if images is not None and resolved.task_kind in LANGUAGE_TASKS:
        raise UnrollError(f"unroll {images} reads images; this recipe is a language model (task {resolved.task_kind})",
                          where=str(recipe))
    with located(str(recipe)):
        network = to_network(resolved)
        # what one process holds at once: its share of a step's batch (torchrun sets WORLD_SIZE), one micro-batch of it
        parts = resolved.training.accumulate * int(os.environ.get("WORLD_SIZE", "1"))
        micro_batch = max(1, resolved.training.batch_size // parts)
        check_budget(network, max_memory, optimize, batch or micro_batch, training, measuring)
    return resolved, network


@app.command()
def build(
    recipe: RecipeArg,
    out: Annotated[Optional[Path], typer.Option(help="output folder", show_default="build/<recipe name>")] = None,
    compile: Annotated[bool, typer.Option("--compile/--no-compile", help="wrap with torch.compile and run it once")] = False,
    optimize: Annotated[bool, typer.Option("--optimize/--no-optimize", help="the compiler's optimisations; --no-optimize computes each update as printed")] = True,
    max_memory: MaxMemory = 16.0,
    set: SetOpt = None,
) -> None:
    """Validate, derive, lower; print a summary; write model.safetensors and the resolved recipe."""
    import torch

    from unroll.checkpoint import weights_writer
    from unroll.files import text_writer, write_files
    from unroll.lower.model import lower_network, sample_input
    from unroll.recipe import recipe_yaml
    from unroll.summary import data_constant_count, flops_per_sample, layout, parameter_count, step_rows

    start = time.perf_counter()
    resolved, network = _within_budget(recipe, set or [], max_memory, optimize=optimize)
    folder = output_folder(out or Path("build") / resolved.name)  # a bad --out fails before the work
    with located(str(recipe)):
        model = lower_network(network, optimize)
    table = Table(title=f"{resolved.name}: {layout(model.plan)}", show_lines=True)
    for column in ("step", "derived as", "computes"):
        table.add_column(column)
    for row in step_rows(model.plan):
        table.add_row(*row)
    console.print(table)
    for step, unused in model.plan.unused():
        note(f"step {step}: {unused.describe()}")
    console.print(f"parameters: {parameter_count(model):,}")
    if constants := data_constant_count(model):
        console.print(f"data constants: {constants:,} (buffers computed from training data by unroll construct; "
                      "zeros until then)")
    console.print(f"FLOPs per sample (forward): {flops_per_sample(model) / 1e9:,.2f} GFLOP")
    if compile:
        compiled = torch.compile(model)
        with torch.no_grad():
            compiled(sample_input(model.network))
        console.print("torch.compile: compiled and ran one forward")
    weights, recipe_file = write_files(folder, {"model.safetensors": weights_writer(model.state_dict()),
                                                "recipe.yaml": text_writer(recipe_yaml(resolved))})
    print(f"wrote {weights} and {recipe_file} ({time.perf_counter() - start:.1f} s)")
    print(_next_steps(recipe, resolved))


def _next_steps(recipe: Path, resolved) -> str:
    """What a freshly built model is for: train it, or load trained weights into it."""
    load = f"load trained weights with unroll.build({str(recipe)!r}, checkpoint=...)"
    if resolved.decoder is not None:  # unroll train trains classifiers
        return f"the weights are freshly initialised (random); {load} (unroll convert reads the reference checkpoints)"
    a = resolved.architecture
    if resolved.task_kind in LANGUAGE_TASKS:  # its own corpus by default
        return (f"the weights are freshly initialised (random); next: unroll train {recipe} --out runs/{resolved.name} "
                f"(on Python's standard library, or --data TEXT_DIR), or {load} (unroll convert reads crate-lm's checkpoints)")
    data = "" if (a.channels, a.image_size) == (1, 8) else " --data IMAGEFOLDER"
    return (f"the weights are freshly initialised (random); next: unroll train {recipe}{data} --out runs/{resolved.name}, "
            f"or {load} (unroll convert reads the reference checkpoints)")


@app.command()
def explain(
    recipe: RecipeArg,
    latex: Annotated[bool, typer.Option("--latex", help="print LaTeX instead of text")] = False,
    set: SetOpt = None,
) -> None:
    """Print, for every step, the exact update, each relaxation, and the update computed."""
    from unroll.api import as_network
    from unroll.explain import explain as explain_network

    network = as_network(recipe, set or [])
    with located(str(recipe)):
        text = explain_network(network, latex=latex)
    print(text, end="")


@app.command()
def convert(
    recipe: RecipeArg,
    checkpoint: Annotated[Path, typer.Argument(help="reference CRATE, CRATE-alpha or CRATE-MAE checkpoint (.pth)", metavar="CHECKPOINT", show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="safetensors file to write", show_default=False)],
    max_memory: MaxMemory = 16.0,
    set: SetOpt = None,
) -> None:
    """Convert a reference checkpoint into weights that `unroll.build(recipe, checkpoint=...)` loads."""
    from unroll.convert import convert as convert_checkpoint

    _, network = _within_budget(recipe, set or [], max_memory)
    with located(str(recipe)):
        path, layout, dropped = convert_checkpoint(network, checkpoint, out)
    if dropped:
        print(f"dropped {len(dropped)} keys the {layout.name} reference stores but never uses: {', '.join(dropped)}")
    print(f"read a {layout.name} checkpoint; wrote {path}")  # plain: rich would wrap the path


@app.command()
def bench(
    recipe: RecipeArg,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    batch: Annotated[int, typer.Option(help="images per step", min=1, max=1 << 20)] = 8,
    repeats: Annotated[int, typer.Option(help="timed runs of each build (medians are reported)", min=1, max=1000)] = 5,
    dtype: Annotated[str, typer.Option(help="float32, or bfloat16 under autocast")] = "float32",
    long: Annotated[bool, typer.Option("--long/--no-long", help="also a patch-8 (long-sequence) forward")] = True,
    memory: Annotated[bool, typer.Option("--memory/--no-memory", help="peak memory of a warm inference forward")] = True,
    max_memory: MaxMemory = 16.0,
    set: SetOpt = None,
) -> None:
    """Throughput and peak memory of the default build against the plain lowering (--no-optimize), same weights."""
    import torch

    from unroll.bench import LONG_SEQUENCE, device_peak_tflops, run as run_bench

    _within_budget(recipe, set or [], max_memory, batch, training=True, optimize=False, images="bench")
    if long:
        try:
            _within_budget(recipe, [*(set or []), *LONG_SEQUENCE], max_memory, batch, optimize=False)
        except UnrollError as e:
            raise UnrollError(f"the patch-8 long-sequence case: {e.message} (--no-long skips it)", where=e.where) from None
    if dtype not in ("float32", "bfloat16"):
        raise UnrollError(f"--dtype must be float32 or bfloat16, found {excerpt(dtype)}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UnrollError("--device cuda: no CUDA device is available")
    with located(str(recipe)):
        rows = run_bench(recipe, set or [], batch, device, repeats, long,
                         torch.bfloat16 if dtype == "bfloat16" else None, memory)
    peak = device_peak_tflops(device, torch.bfloat16 if dtype == "bfloat16" else torch.float32)
    threads = torch.get_num_threads()
    table = Table(title=f"{recipe.name} on {device} ({threads} threads), {dtype}, batch {batch}: "
                        "a = --no-optimize (as printed), b = default build; medians of "
                        f"{repeats} alternating runs")
    table.caption = ("train step = forward + backward + AdamW; GFLOP as torch's FlopCounterMode counts a warm forward; "
                     "peak = memory held by tensors during a warm inference forward (torch profiler)")
    for column in ("case", "", "a", "b", "b / a"):
        table.add_column(column, justify="right" if column not in ("case", "") else "left")
    for r in rows:
        case = f"{r['case']}, {r['tokens']} tokens"
        table.add_row(case, "forward, images/s", f"{r['a_forward_img_s']:.2f}", f"{r['b_forward_img_s']:.2f}", f"{r['forward_ratio']:.2f}x")
        if "train_ratio" in r:
            table.add_row("", "train step, images/s", f"{r['a_train_img_s']:.2f}", f"{r['b_train_img_s']:.2f}", f"{r['train_ratio']:.2f}x")
        table.add_row("", "forward GFLOP", f"{r['a_gflop']:.1f}", f"{r['b_gflop']:.1f}", "")
        achieved = [f"{r[f'{t}_gflop_s']:.0f}" + (f" ({r[f'{t}_gflop_s'] / 1e3 / peak:.1%} of peak)" if peak else "") for t in "ab"]
        table.add_row("", "forward GFLOP/s", *achieved, "")
        if "a_peak_mib" in r:
            mem = [f"{r[f'{t}_peak_mib']:.0f}" if r[f"{t}_peak_mib"] is not None else "n/a" for t in "ab"]
            ratio = f"{r['memory_ratio']:.2f}x" if "memory_ratio" in r else ""
            table.add_row("", "forward peak, MiB", *mem, ratio)
    console.print(table)


@app.command()
def train(
    recipe: RecipeArg,
    data: DataOpt = None,
    out: Annotated[Optional[Path], typer.Option(help="output folder", show_default="runs/<recipe name>")] = None,
    seed: Annotated[int, typer.Option(help="seed of the initial weights, the data order and the augmentation",
                                      min=0, max=2**32 - 1)] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="continue the run in --out where it stopped")] = False,
    init: Annotated[Optional[Path], typer.Option("--init", help="start from these weights (model.safetensors, or a run "
                                                 "folder): fine-tuning; a new class count gets a fresh classifier",
                                                 show_default=False)] = None,
    tokenizer: Annotated[Optional[Path], typer.Option(help="a language model's tokenizer.json (e.g. GPT-2's)",
                                                      show_default="a byte-level BPE trained on the training text")] = None,
    baseline: Annotated[Optional[str], typer.Option(help="gpt: train a standard GPT at the recipe's shape instead, "
                                                    "to compare against", show_default=False)] = None,
    workers: WorkersOpt = None,
    compile: Annotated[bool, typer.Option("--compile/--no-compile", help="torch.compile the training step")] = False,
    precision: PrecisionOpt = None,
    device: DeviceOpt = None,
    max_memory: MaxMemory = 16.0,
    set: SetOpt = None,
) -> None:
    """Train the recipe's classifier: progress bar, metrics.csv, checkpoints each epoch (under torchrun: DDP)."""
    from unroll.train.loop import train as train_model

    resolved, _ = _within_budget(recipe, set or [], max_memory, batch=None, training=True)
    folder = out or Path("runs") / resolved.name
    rows = train_model(recipe, folder, data, seed, set or [], resume, device, init=init, workers=workers,
                       compile=compile, precision=precision, tokenizer=tokenizer, baseline=baseline)
    if rows and int(os.environ.get("RANK", "0")) == 0:
        last = rows[-1]
        score = f"val_acc {last['val_acc']:.4f}, " if "val_acc" in last else f"val_ppl {last['val_ppl']:.2f}, "
        print(f"epoch {last['epoch']}: {score}val_loss {last['val_loss']:.4f}; wrote {folder}")


@app.command("eval")
def evaluate(
    recipe: RecipeArg,
    checkpoint: Annotated[Path, typer.Option(help="model.safetensors (from unroll train or unroll convert), or a run folder",
                                             show_default=False)],
    data: DataOpt = None,
    batch: Annotated[int, typer.Option(help="images per forward", min=1, max=1 << 16)] = 256,
    out: Annotated[Optional[Path], typer.Option(help="JSON file of the scores", show_default="runs/<recipe name>/eval.json")] = None,
    workers: WorkersOpt = None,
    precision: PrecisionOpt = None,
    device: DeviceOpt = None,
    max_memory: MaxMemory = 16.0,
    set: SetOpt = None,
) -> None:
    """Top-1 and top-5 accuracy, loss and images/s of the weights on the data's validation split."""
    import json

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from unroll.files import text_writer, write_files
    from unroll.train.evaluate import SCORES, evaluate_recipe

    resolved, network = _within_budget(recipe, set or [], max_memory, batch, images="eval")
    target = out or Path("runs") / resolved.name / "eval.json"
    if target.is_dir():
        raise UnrollError("--out names the JSON file to write, and this is a folder", where=str(target))
    output_folder(target.parent)  # a bad --out fails before the work
    progress = Progress(TextColumn("evaluating"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                        TimeElapsedColumn(), console=Console(stderr=True), transient=True)
    with progress:
        task = progress.add_task("", total=None, rate="")
        began = time.perf_counter()

        def advance(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total,
                            rate=f"{done / max(time.perf_counter() - began, 1e-9):,.0f} images/s")

        with located(str(recipe)):
            scores, source = evaluate_recipe(resolved, network, checkpoint, data, batch, workers, device, precision, advance)
    record = {"recipe": str(recipe), "checkpoint": str(checkpoint), "data": data or resolved.training.data,
              "split": "validation", **scores.as_dict()}
    table = Table(title=f"{resolved.name} on {source} (validation split)")
    for key in SCORES:
        table.add_column(key, justify="right")
    table.add_row(f"{scores.top1:.2%}", f"{scores.top5:.2%}", f"{scores.loss:.4f}", f"{scores.images:,}",
                  f"{scores.images_per_second:,.1f}")
    console.print(table)
    written, = write_files(target.parent, {target.name: text_writer(json.dumps(record, indent=2) + "\n")})
    print(f"top-1 {scores.top1:.4f}, top-5 {scores.top5:.4f}, loss {scores.loss:.4f} on {scores.images:,} images; wrote {written}")


@app.command()
def generate(
    recipe: RecipeArg,
    checkpoint: RunOpt,
    prompt: Annotated[str, typer.Option(help="the text to continue", show_default=False)],
    tokens: Annotated[int, typer.Option(help="new tokens to sample", min=1, max=1 << 20)] = 64,
    temperature: Annotated[float, typer.Option(help="0: always the most likely token", min=0.0, max=100.0)] = 1.0,
    top_k: Annotated[Optional[int], typer.Option("--top-k", help="sample among the k most likely tokens", min=1,
                                                 show_default="all")] = None,
    seed: Annotated[int, typer.Option(help="seed of the sampling", min=0, max=2**32 - 1)] = 0,
    tokenizer: Annotated[Optional[Path], typer.Option(help="tokenizer.json", show_default="the run folder's")] = None,
    device: DeviceOpt = None,
    max_memory: MaxMemory = 16.0,
    set: SetOpt = None,
) -> None:
    """Sample text from a trained language model (the prompt, then its continuation)."""
    from unroll.generate import generate as sample_text

    resolved, network = _within_budget(recipe, set or [], max_memory)
    if resolved.task_kind != "causal_lm":
        raise UnrollError(f"unroll generate continues text with a causal language model; this recipe's task is "
                          f"{resolved.task_kind}", where=str(recipe))
    with located(str(recipe)):
        text, notes = sample_text(resolved, network, checkpoint, prompt, tokens, temperature, top_k, seed, tokenizer,
                                  device)
    for line in notes:
        note(line)
    print(prompt + text)


@app.command()
def construct(
    recipe: RecipeArg,
    data: DataOpt = None,
    out: Annotated[Optional[Path], typer.Option(help="output folder", show_default="runs/<recipe name>")] = None,
    max_memory: MaxMemory = 16.0,
    set: SetOpt = None,
) -> None:
    """Compute the network layer by layer from labelled training data (forward construction, ReduNet): no backpropagation."""
    from unroll.construct import METRICS, construct_recipe

    folder, rows, seconds = construct_recipe(recipe, data, out, set or [], max_memory)
    table = Table(title=f"{recipe.name}: ΔR of the training features and nearest-subspace accuracy, layer by layer (0: the input)")
    for key in METRICS:
        table.add_column(key, justify="right")
    for row in rows:
        table.add_row(*(f"{row[k]:.4f}" if isinstance(row[k], float) else str(row[k]) for k in METRICS))
    console.print(table)
    print(f"held-out accuracy (nearest subspace): {rows[0]['val_acc']:.4f} on the input, {rows[-1]['val_acc']:.4f} after "
          f"{len(rows) - 1} layers; ΔR {rows[0]['delta_R']:.3f} -> {rows[-1]['delta_R']:.3f}; wrote {folder} ({seconds:.1f} s)")


def _built(recipe: Path, checkpoint: Optional[Path], overrides: list[str], max_memory: float, batch: int = 1,
           measuring: bool = False, command: str | None = None):
    """(the resolved recipe, its model in eval mode with the checkpoint's weights); ``command``: one
    that reads images."""
    from unroll.api import build

    resolved, network = _within_budget(recipe, overrides, max_memory, batch, measuring=measuring, images=command)
    with located(str(recipe)):
        return resolved, build(network, checkpoint=checkpoint).eval()


TextDataOpt = Annotated[Optional[str], typer.Option("--data", help="a folder of text files, or one text file",
                                                     show_default="the recipe's training.data, else Python's standard library")]
TokenizerOpt = Annotated[Optional[Path], typer.Option(help="the tokenizer.json the weights were trained with",
                                                      show_default="the run folder's")]


def _held_out_text(resolved, checkpoint: Optional[Path], tokenizer: Optional[Path], data: Optional[str], windows: int):
    """(the weights file or None, the held-out windows of a language recipe's text, tokenized as
    the run was: its tokenizer.json beside the weights, or --tokenizer; none of either: the cached
    BPE of the corpus, as unroll train makes it)."""
    from unroll.train import text
    from unroll.train.state import weights_in
    from unroll.train.tasks import text_spec

    a = resolved.architecture
    weights = weights_in(checkpoint) if checkpoint is not None else None
    tok = text.run_tokenizer(weights, tokenizer, a.vocab_size)
    return weights, text.held_out_windows(text_spec(resolved, data), a.vocab_size, a.context, windows, tok)


@app.command()
def measure(
    recipe: RecipeArg,
    checkpoint: Annotated[Optional[Path], typer.Option(help="model.safetensors (e.g. from unroll train; a language "
                                                       "model's run folder)", show_default="fresh random weights")] = None,
    data: DataOpt = None,
    out: Annotated[Optional[Path], typer.Option(help="folder for measure.csv and measure.png", show_default="runs/<recipe name>/measure")] = None,
    samples: Annotated[int, typer.Option(help="held-out images (a language model: windows of context tokens) to "
                                              "measure on", min=1, max=100_000)] = 256,
    tokenizer: TokenizerOpt = None,
    max_memory: MaxMemory = 16.0,
    set: SetOpt = None,
) -> None:
    """Per layer, the objective each layer was derived from: R^c, sparsity, R, sparse rate reduction."""
    from unroll.api import build
    from unroll.measure import columns, measure as measure_layers, write
    from unroll.train import data as datasets
    from unroll.train.transforms import eval_transform

    # one forward of all
    resolved, network = _within_budget(recipe, set or [], max_memory, samples, measuring=True)
    folder = output_folder(out or Path("runs") / resolved.name / "measure")
    a = resolved.architecture
    with located(str(recipe)):
        if resolved.task_kind in LANGUAGE_TASKS:
            checkpoint, held = _held_out_text(resolved, checkpoint, tokenizer, data, samples)
            inputs = held.ids
            read = (f"{len(inputs):,} held-out windows of {a.context} tokens of {held.name}, "
                    f"{inputs.numel():,} tokens")
        else:
            if tokenizer is not None:
                raise UnrollError("--tokenizer is for language models; this recipe reads images")
            held_out = datasets.open_data(data or resolved.training.data, a.image_size, a.channels).val
            inputs, _ = datasets.stack(held_out, samples, eval_transform(resolved.training, a.image_size, a.channels))
            read = f"{len(inputs)} held-out images"
        model = build(network, checkpoint=checkpoint).eval()
    rows = measure_layers(model, inputs)
    table = Table(title=f"{resolved.name}: the objective, layer by layer ({read})")
    fields = columns(rows)
    for key in fields:
        table.add_column(key, justify="right")
    for row in rows:
        values = (row.get(key, "") for key in fields)
        table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in values))
    console.print(table)
    csv_path, png_path = write(rows, folder, resolved.name)
    print(f"wrote {csv_path} and {png_path}")


@app.command()
def features(
    recipe: RecipeArg,
    checkpoint: RunOpt,
    out: Annotated[Path, typer.Option(help="folder for features.md and features.html", show_default=False)],
    data: TextDataOpt = None,
    tokenizer: TokenizerOpt = None,
    layer: Annotated[Optional[int], typer.Option(help="layer to read, counted from 1",
                                                 show_default="the last with a sparse-coding step")] = None,
    top: Annotated[int, typer.Option(help="contexts listed per coordinate", min=1, max=1000)] = 5,
    tokens: Annotated[int, typer.Option(help="held-out tokens to read at most (at least one window of context tokens)", min=1, max=1 << 30)] = 65_536,
    device: DeviceOpt = None,
    max_memory: MaxMemory = 16.0,
    set: SetOpt = None,
) -> None:
    """For each coordinate of a layer's sparse code, the held-out text that activates it most (features.md, .html)."""
    from unroll import features as sparse
    from unroll.api import build
    from unroll.plan import plan
    from unroll.train.device import pick_device

    resolved = _language(recipe, set or [], "features")
    a = resolved.architecture
    per_batch = max(1, sparse.BATCH_TOKENS // a.context)
    resolved, network = _within_budget(recipe, set or [], max_memory, per_batch)
    folder = output_folder(out)  # a bad --out fails before the work
    with located(str(recipe)):
        sparse.sparse_layer(plan(network), layer)  # a wrong --layer fails before the text is read
        weights, held = _held_out_text(resolved, checkpoint, tokenizer, data, max(1, tokens // a.context))
        model = build(network, checkpoint=weights).to(pick_device(device)).eval()
        found = sparse.collect(model, held.ids, layer, top)
    header = sparse.Header(resolved.name, str(checkpoint), held.name)
    written = sparse.write(found, held.tokenizer, header, folder)
    print(f"layer {found.layer} ({found.step}): {len(found.live):,} of {found.values.shape[0]:,} coordinates fire on "
          f"{found.tokens:,} held-out tokens, {len(found.dead):,} never do; wrote {written[0]} and {written[1]}")


def _language(recipe: Path, overrides: list[str], command: str):
    """The resolved recipe of a command that reads text; refused for any other task."""
    from unroll.recipe import load_recipe

    resolved = load_recipe(recipe, overrides)
    if resolved.task_kind not in LANGUAGE_TASKS:
        raise UnrollError(f"unroll {command} reads text through a language model; this recipe's task is "
                          f"{resolved.task_kind}", where=str(recipe))
    return resolved


@app.command()
def attention(
    recipe: RecipeArg,
    checkpoint: Annotated[Path, typer.Option(help="model.safetensors", show_default=False)],
    image: Annotated[Path, typer.Option(help="an image file", show_default=False)],
    out: Annotated[Path, typer.Option(help="folder for the PNG overlays", show_default=False)],
    layer: Annotated[Optional[int], typer.Option(help="layer to look at, counted from 1", show_default="the last")] = None,
    max_memory: MaxMemory = 16.0,
    set: SetOpt = None,
) -> None:
    """Save each head's attention of the cls token over the patches as PNG overlays on the image."""
    from unroll.attention import cls_attention, load_image, save_overlays

    output_folder(out)
    resolved, model = _built(recipe, checkpoint, set or [], max_memory, command="attention")
    a = resolved.architecture
    picture = load_image(image, a.image_size, a.channels)
    number = model.plan.encoder.depth if layer is None else layer
    maps = cls_attention(model, picture[None], number)[0]
    paths = save_overlays(picture, maps, out, a.image_size // a.patch_size)
    print(f"wrote {len(paths)} images to {out} (layer {number}, {maps.shape[0]} heads)")


def main(argv: list[str] | None = None) -> int:
    """Run the command line on ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    try:
        # standalone: typer prints usage errors itself (exit 2) and turns Ctrl-C into exit 130
        app(args=argv, prog_name="unroll", standalone_mode=True)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if code == 130:
            print("interrupted", file=sys.stderr)
        return code
    except UnrollError as e:
        print("error: " + e.render(), file=sys.stderr)  # plain: rich would wrap long paths
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # the file system said no somewhere not yet wrapped: still the user's to fix
        where = f"{excerpt(str(e.filename), 200)}: " if e.filename else ""
        print(f"error: {where}{e.strerror or type(e).__name__}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:
        if not isinstance(e, MemoryError) and "memory" not in str(e).lower():
            raise  # a bug in unroll: the traceback is the report
        print(f"error: out of memory ({str(e).splitlines()[0][:200]}); try smaller sizes or a smaller batch",
              file=sys.stderr)
        return 1
    return 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()
