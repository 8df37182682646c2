"""``unroll build | explain | convert | bench | train | measure | attention``: the command line,
with errors and no tracebacks."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from unroll.errors import UnrollError, located

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Derive white-box networks from their objectives.")
console = Console()

RecipeArg = Annotated[Path, typer.Argument(help="recipe YAML file", show_default=False)]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="override a recipe field: key.sub=value")]


@app.command()
def build(
    recipe: RecipeArg,
    out: Annotated[Optional[Path], typer.Option(help="output folder [default: build/<recipe name>]")] = None,
    compile: Annotated[bool, typer.Option("--compile/--no-compile", help="wrap with torch.compile and run it once")] = False,
    optimize: Annotated[bool, typer.Option("--optimize/--no-optimize", help="the compiler's optimisations; --no-optimize computes each update as printed")] = True,
    set: SetOpt = None,
) -> None:
    """Validate, derive, lower; print a summary; write model.safetensors and the resolved recipe."""
    import torch

    from unroll.checkpoint import save_weights
    from unroll.lower.model import lower_network
    from unroll.recipe import load_recipe, to_network, write_recipe
    from unroll.summary import flops_per_sample, parameter_count, step_rows

    start = time.perf_counter()
    resolved = load_recipe(recipe, set or [])
    with located(str(recipe)):
        model = lower_network(to_network(resolved), optimize)
    table = Table(title=f"{resolved.name}: one layer, repeated {model.network.depth} times", show_lines=True)
    for column in ("step", "derived as", "computes"):
        table.add_column(column)
    for row in step_rows(model):
        table.add_row(*row)
    console.print(table)
    console.print(f"parameters: {parameter_count(model):,}")
    console.print(f"FLOPs per sample (forward): {flops_per_sample(model) / 1e9:,.2f} GFLOP")
    if compile:
        spec = model.network.frontend
        compiled = torch.compile(model)
        with torch.no_grad():
            compiled(torch.zeros(1, spec.channels, spec.image_size, spec.image_size))
        console.print("torch.compile: compiled and ran one forward")
    folder = out or Path("build") / resolved.name
    save_weights(model.state_dict(), folder / "model.safetensors")
    write_recipe(resolved, folder / "recipe.yaml")
    console.print(f"wrote {folder / 'model.safetensors'} and {folder / 'recipe.yaml'} ({time.perf_counter() - start:.1f} s)")


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
    checkpoint: Annotated[Path, typer.Argument(help="reference CRATE, CRATE-alpha or CRATE-MAE checkpoint (.pth)", show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="safetensors file to write")],
) -> None:
    """Convert a reference checkpoint into weights that `unroll.build(recipe, checkpoint=...)` loads."""
    from unroll.convert import convert as convert_checkpoint

    path, layout, dropped = convert_checkpoint(recipe, checkpoint, out)
    if dropped:
        print(f"dropped {len(dropped)} keys the {layout.name} reference stores but never uses: {', '.join(dropped)}")
    print(f"read a {layout.name} checkpoint; wrote {path}")  # plain: rich would wrap the path


@app.command()
def bench(
    recipe: RecipeArg,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    batch: Annotated[int, typer.Option(help="images per step", min=1)] = 8,
    repeats: Annotated[int, typer.Option(help="timed runs of each build (medians are reported)", min=1)] = 5,
    dtype: Annotated[str, typer.Option(help="float32, or bfloat16 under autocast")] = "float32",
    long: Annotated[bool, typer.Option("--long/--no-long", help="also a patch-8 (long-sequence) forward")] = True,
    memory: Annotated[bool, typer.Option("--memory/--no-memory", help="peak memory of a warm inference forward")] = True,
    set: SetOpt = None,
) -> None:
    """Throughput and peak memory of the default build against the plain lowering (--no-optimize), same weights."""
    import torch

    from unroll.bench import device_peak_tflops, run as run_bench

    if dtype not in ("float32", "bfloat16"):
        raise UnrollError(f"--dtype must be float32 or bfloat16, found {dtype!r}")
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
    data: Annotated[Optional[str], typer.Option(help="digits, mixtures, or an ImageFolder directory [default: the recipe's training.data]")] = None,
    out: Annotated[Optional[Path], typer.Option(help="output folder [default: runs/<recipe name>]")] = None,
    seed: Annotated[int, typer.Option(help="seed of the initial weights and of the data order")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="continue the run in --out where it stopped")] = False,
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda [default: cuda if available]")] = None,
    set: SetOpt = None,
) -> None:
    """Train the recipe's classifier: progress bar, metrics.csv, checkpoints each epoch (under torchrun: DDP)."""
    from unroll.recipe import load_recipe
    from unroll.train.loop import train as train_model

    folder = out or Path("runs") / load_recipe(recipe, set or []).name
    rows = train_model(recipe, folder, data, seed, set or [], resume, device)
    if rows and int(os.environ.get("RANK", "0")) == 0:
        last = rows[-1]
        print(f"epoch {last['epoch']}: val_acc {last['val_acc']:.4f}, val_loss {last['val_loss']:.4f}; wrote {folder}")


def _built(recipe: Path, checkpoint: Optional[Path], overrides: list[str]):
    from unroll.api import build
    from unroll.recipe import load_recipe

    resolved = load_recipe(recipe, overrides)
    with located(str(recipe)):
        return resolved, build(resolved, checkpoint=checkpoint).eval()


@app.command()
def measure(
    recipe: RecipeArg,
    checkpoint: Annotated[Optional[Path], typer.Option(help="model.safetensors (e.g. from unroll train)")] = None,
    data: Annotated[Optional[str], typer.Option(help="digits, mixtures or an ImageFolder [default: the recipe's training.data]")] = None,
    out: Annotated[Optional[Path], typer.Option(help="folder for measure.csv and measure.png [default: runs/<name>/measure]")] = None,
    samples: Annotated[int, typer.Option(help="held-out images to measure on", min=1)] = 256,
    set: SetOpt = None,
) -> None:
    """Per layer, the objective each layer was derived from: R^c, sparsity, R, sparse rate reduction."""
    from unroll.measure import measure as measure_layers, write
    from unroll.train import data as datasets

    resolved, model = _built(recipe, checkpoint, set or [])
    a = resolved.architecture
    with located(str(recipe)):
        _, held_out = datasets.split(datasets.load(data or resolved.training.data, a.image_size, a.channels))
    rows = measure_layers(model, held_out.images[:samples])
    table = Table(title=f"{resolved.name}: the objective, layer by layer ({min(samples, len(held_out))} held-out images)")
    for key in rows[0]:
        table.add_column(key, justify="right")
    for row in rows:
        table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()))
    console.print(table)
    folder = out or Path("runs") / resolved.name / "measure"
    csv_path, png_path = write(rows, folder, resolved.name)
    print(f"wrote {csv_path} and {png_path}")


@app.command()
def attention(
    recipe: RecipeArg,
    checkpoint: Annotated[Path, typer.Option(help="model.safetensors")],
    image: Annotated[Path, typer.Option(help="an image file")],
    out: Annotated[Path, typer.Option(help="folder for the PNG overlays")],
    layer: Annotated[int, typer.Option(help="layer to look at, from 1 [default: the last]")] = 0,
    set: SetOpt = None,
) -> None:
    """Save each head's attention of the cls token over the patches as PNG overlays on the image."""
    from unroll.attention import cls_attention, load_image, save_overlays

    resolved, model = _built(recipe, checkpoint, set or [])
    a = resolved.architecture
    picture = load_image(image, a.image_size, a.channels)
    index = (layer or resolved.architecture.depth) - 1
    maps = cls_attention(model, picture[None], index)[0]
    paths = save_overlays(picture, maps, out, a.image_size // a.patch_size)
    print(f"wrote {len(paths)} images to {out} (layer {index + 1}, {maps.shape[0]} heads)")


def main(argv: list[str] | None = None) -> int:
    try:
        app(args=argv, standalone_mode=False)
    except UnrollError as e:
        print("error: " + e.render(), file=sys.stderr)  # plain: rich would wrap long paths
        return 2
    except typer.Exit as e:
        return e.exit_code
    except (typer.Abort, KeyboardInterrupt):
        print("aborted", file=sys.stderr)
        return 130
    except Exception as e:  # click usage errors
        import click

        if isinstance(e, click.ClickException):
            e.show()
            return e.exit_code
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
