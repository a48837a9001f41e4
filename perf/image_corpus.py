"""A labelled corpus of real images of each kind, for the image-kind classifier's accuracy.

    .venv/bin/python -m perf.image_corpus [build/image_corpus]

Nothing is committed: every image comes from a package that ships it or from real rendering code.
- photo: photographs bundled with scikit-image and scikit-learn;
- document: a photographed page (scikit-image) and pages, slides, forms, screenshots and code
  rendered with real fonts (the DejaVu and STIX TrueType fonts matplotlib ships) from real text
  (the Python language reference as the standard library ships it, and its source code);
- diagram: charts and plots drawn by matplotlib, graphs drawn by networkx, circuits and
  flowcharts drawn by schemdraw.

Writes `<directory>/<kind>/<name>.png` and returns (path, kind) pairs; images already written
are kept, so a second call costs nothing.
"""

from __future__ import annotations

import inspect
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vlm_serving.image_kind import ImageKind

DEFAULT_DIRECTORY = Path(__file__).resolve().parents[1] / "build" / "image_corpus"


# ---- photographs -----------------------------------------------------------------------------

def _photos() -> dict[str, Callable[[], Image.Image]]:
    from skimage import data
    from sklearn.datasets import load_sample_images

    def sample(index: int) -> Callable[[], Image.Image]:
        return lambda: Image.fromarray(load_sample_images().images[index])

    def skimage_image(name: str) -> Callable[[], Image.Image]:
        return lambda: Image.fromarray(getattr(data, name)())

    photos = {name: skimage_image(name) for name in (
        "astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "hubble_deep_field",
        "immunohistochemistry",
    )}
    photos.update(motorcycle=lambda: Image.fromarray(data.stereo_motorcycle()[0]), china=sample(0), flower=sample(1))
    return photos


# ---- documents ---------------------------------------------------------------------------------

def _fonts() -> dict[str, Path]:
    import matplotlib

    ttf = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    return {"sans": ttf / "DejaVuSans.ttf", "serif": ttf / "DejaVuSerif.ttf", "mono": ttf / "DejaVuSansMono.ttf",
            "sans_bold": ttf / "DejaVuSans-Bold.ttf", "stix": ttf / "STIXGeneral.ttf"}


def _prose(*topics: str) -> str:
    """Real English text: sections of the Python language reference (`pydoc_data`, in the stdlib)."""
    from pydoc_data.topics import topics as reference

    return " ".join(" ".join(reference[name].split()) for name in topics)


def _page(size, font, text, margin=60, size_pt=18, columns=1, background="white", ink="black",
          title=None, line_gap=1.35) -> Image.Image:
    page = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(page)
    fonts = _fonts()
    body = ImageFont.truetype(str(fonts[font]), size_pt)
    top = margin
    if title:
        heading = ImageFont.truetype(str(fonts["sans_bold"]), int(size_pt * 1.8))
        draw.text((margin, top), title, font=heading, fill=ink)
        top += int(size_pt * 3.2)
    gutter = 30
    column_width = (size[0] - 2 * margin - gutter * (columns - 1)) // columns
    chars = max(10, int(column_width / (size_pt * 0.55)))
    lines = textwrap.wrap(text, chars)
    per_column = max(1, int((size[1] - top - margin) / (size_pt * line_gap)))
    for column in range(columns):
        x = margin + column * (column_width + gutter)
        for row, line in enumerate(lines[column * per_column : (column + 1) * per_column]):
            draw.text((x, top + row * size_pt * line_gap), line, font=body, fill=ink)
    return page


def _form() -> Image.Image:
    page = Image.new("RGB", (1240, 1754), "white")
    draw = ImageDraw.Draw(page)
    fonts = _fonts()
    label, value = ImageFont.truetype(str(fonts["sans_bold"]), 22), ImageFont.truetype(str(fonts["sans"]), 22)
    draw.text((80, 70), "INVOICE No. 2026-1125", font=ImageFont.truetype(str(fonts["sans_bold"]), 40), fill="black")
    fields = [("Bill to", "Example Imaging Ltd., 12 Harbour Road"), ("Date", "25 November 2026"),
              ("Terms", "Net 30 days"), ("Reference", "Purchase order 48213")]
    for row, (name, text) in enumerate(fields):
        draw.text((80, 170 + row * 44), f"{name}:", font=label, fill="black")
        draw.text((300, 170 + row * 44), text, font=value, fill="black")
    items = _prose("assignment").split(". ")
    draw.line((80, 400, 1160, 400), fill="black", width=2)
    for row, item in enumerate(items[:26]):
        y = 420 + row * 44
        draw.text((80, y), textwrap.shorten(item, 70), font=value, fill="black")
        draw.text((1040, y), f"{(row * 37) % 400 + 12}.00", font=value, fill="black")
    return page


def _slide() -> Image.Image:
    page = Image.new("RGB", (1600, 900), "#f4f4f4")
    draw = ImageDraw.Draw(page)
    fonts = _fonts()
    draw.rectangle((0, 0, 1600, 130), fill="#1f3b5c")
    draw.text((60, 35), "Serving vision-language models", font=ImageFont.truetype(str(fonts["sans_bold"]), 56),
              fill="white")
    bullet = ImageFont.truetype(str(fonts["sans"]), 34)
    for row, sentence in enumerate(_prose("execmodel").split(". ")[:12]):
        draw.text((90, 180 + row * 58), "\u2022 " + textwrap.shorten(sentence, 80), font=bullet, fill="#202020")
    return page


def _screenshot(dark: bool) -> Image.Image:
    """An editor window showing real source code (a standard-library module's)."""
    background, ink, gutter = ("#1e1e1e", "#d4d4d4", "#858585") if dark else ("white", "#1a1a1a", "#999999")
    page = Image.new("RGB", (1440, 900), background)
    draw = ImageDraw.Draw(page)
    draw.rectangle((0, 0, 1440, 34), fill="#3c3c3c" if dark else "#dddddd")
    mono = ImageFont.truetype(str(_fonts()["mono"]), 17)
    source = inspect.getsource(textwrap if dark else __import__("shlex")).splitlines()[40:80]
    for row, line in enumerate(source):
        draw.text((14, 48 + row * 21), f"{row + 41:4d}", font=mono, fill=gutter)
        draw.text((70, 48 + row * 21), line, font=mono, fill=ink)
    return page


def _web_page() -> Image.Image:
    page = Image.new("RGB", (1366, 1024), "white")
    draw = ImageDraw.Draw(page)
    fonts = _fonts()
    draw.rectangle((0, 0, 1366, 70), fill="#24292f")
    draw.text((30, 20), "docs.example.org / library / email", font=ImageFont.truetype(str(fonts["sans"]), 24),
              fill="white")
    body = _page((1000, 940), "sans", _prose("import", "naming"), margin=30, size_pt=19,
                 title="The import system")
    page.paste(body, (300, 80))
    nav = ImageFont.truetype(str(fonts["sans"]), 19)
    for row, name in enumerate(sorted(sys.stdlib_module_names)[:36]):
        draw.text((30, 100 + row * 25), name, font=nav, fill="#0969da")
    return page


def _documents() -> dict[str, Callable[[], Image.Image]]:
    from skimage import data

    a4 = (1240, 1754)
    return {
        "photographed_page": lambda: Image.fromarray(data.page()),
        "letter_serif": lambda: _page(a4, "serif", _prose("compound"), size_pt=22),
        "two_columns": lambda: _page(a4, "sans", _prose("types"),
                                     size_pt=17, columns=2, title="Notes on the standard library"),
        "report_stix": lambda: _page(a4, "stix", _prose("numeric-types", "comparisons"), size_pt=24,
                                     title="Numeric types"),
        "small_print": lambda: _page((1654, 2339), "sans", _prose("specialnames"), size_pt=16),
        "sepia_book": lambda: _page((1000, 1400), "serif", _prose("try", "with"), size_pt=24,
                                    background="#f3e9d2", ink="#3b2f20"),
        "invoice": _form,
        "slide": _slide,
        "editor_dark": lambda: _screenshot(dark=True),
        "editor_light": lambda: _screenshot(dark=False),
        "web_page": _web_page,
        "receipt": lambda: _page((600, 1600), "mono", _prose("calls", "function"), size_pt=18, margin=30),
    }


# ---- diagrams ----------------------------------------------------------------------------------

def _figure(draw: Callable, size=(8, 6)) -> Image.Image:
    import matplotlib

    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt

    figure = plt.figure(figsize=size, dpi=120)
    draw(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return Image.open(buffer).convert("RGB")


def _charts() -> dict[str, Callable[[], Image.Image]]:
    rng = np.random.default_rng(0)
    x = np.linspace(0, 10, 200)

    def line(fig):
        axes = fig.add_subplot()
        for k in range(3):
            axes.plot(x, np.sin(x + k) * (k + 1), label=f"series {k}")
        axes.set(title="Response over time", xlabel="time (s)", ylabel="amplitude")
        axes.legend()
        axes.grid(True)

    def bars(fig):
        axes = fig.add_subplot()
        axes.bar(["Q1", "Q2", "Q3", "Q4"], [12, 17, 9, 21], color=["#4c72b0", "#dd8452", "#55a868", "#c44e52"])
        axes.set(title="Requests per quarter (millions)")

    def scatter(fig):
        axes = fig.add_subplot()
        axes.scatter(rng.normal(size=300), rng.normal(size=300), c=rng.uniform(size=300), cmap="viridis", s=18)
        axes.set(title="Latency vs size", xlabel="size", ylabel="latency")

    def pie(fig):
        fig.add_subplot().pie([35, 25, 20, 12, 8], labels=["photo", "document", "diagram", "other", "unknown"],
                              autopct="%1.0f%%")

    def histogram(fig):
        axes = fig.add_subplot()
        axes.hist(rng.gamma(2.0, 1.5, 2000), bins=40, color="#55a868", edgecolor="black")
        axes.set(title="Distribution of answer lengths", xlabel="tokens", ylabel="count")

    def stacked(fig):
        axes = fig.add_subplot()
        axes.stackplot(np.arange(24), rng.uniform(1, 3, (3, 24)).cumsum(axis=1), labels=["a", "b", "c"])
        axes.legend(loc="upper left")
        axes.set(title="Cumulative load by hour")

    def boxes(fig):
        axes = fig.add_subplot()
        axes.boxplot([rng.normal(k, 1 + k / 3, 100) for k in range(5)])
        axes.set(title="p50 latency per build", ylabel="ms")

    def subplots(fig):
        for index in range(4):
            axes = fig.add_subplot(2, 2, index + 1)
            axes.plot(x, np.cos(x * (index + 1)), color=f"C{index}")
            axes.set_title(f"channel {index}")

    def step_and_error(fig):
        axes = fig.add_subplot()
        means = rng.uniform(2, 8, 8)
        axes.errorbar(np.arange(8), means, yerr=rng.uniform(0.2, 1, 8), fmt="o-", capsize=4)
        axes.step(np.arange(8), means - 1, where="mid")
        axes.set(title="Throughput with 95% intervals")

    def horizontal_bars(fig):
        axes = fig.add_subplot()
        axes.barh([f"model {k}" for k in range(8)], rng.uniform(10, 90, 8), color="#8172b3")
        axes.set(xlabel="accuracy (%)")

    return {"line_chart": lambda: _figure(line), "bar_chart": lambda: _figure(bars),
            "scatter_plot": lambda: _figure(scatter), "pie_chart": lambda: _figure(pie, (6, 6)),
            "histogram": lambda: _figure(histogram), "stacked_area": lambda: _figure(stacked),
            "box_plot": lambda: _figure(boxes), "small_multiples": lambda: _figure(subplots, (10, 7)),
            "error_bars": lambda: _figure(step_and_error), "horizontal_bars": lambda: _figure(horizontal_bars)}


def _graph(kind: str) -> Image.Image:
    import networkx as nx

    graph = {"tree": lambda: nx.balanced_tree(2, 3), "karate": nx.karate_club_graph,
             "grid": lambda: nx.grid_2d_graph(4, 5)}[kind]()

    def draw(fig):
        axes = fig.add_subplot()
        layout = nx.spring_layout(graph, seed=1)
        nx.draw_networkx(graph, layout, ax=axes, node_color="#a1c9f4", edgecolors="black", font_size=8)
        axes.set_axis_off()

    return _figure(draw)


def _schematic(kind: str) -> Image.Image:
    import io

    import schemdraw
    import schemdraw.elements as elm
    import schemdraw.flow as flow

    schemdraw.use("matplotlib")
    with schemdraw.Drawing(show=False) as drawing:
        if kind == "rc_circuit":
            elm.SourceSin().up().label("10 V")
            elm.Resistor().right().label("1 k\u03a9")
            elm.Capacitor().down().label("10 \u03bcF")
            elm.Line().left()
        elif kind == "amplifier":
            amp = elm.Opamp(leads=True)
            elm.Line().left().at(amp.in2).length(1)
            elm.Resistor().down().label("R1")
            elm.Ground()
            elm.Line().left().at(amp.in1).length(2).dot()
            elm.Resistor().left().label("Rin")
            elm.Resistor().at(amp.out).up().length(2).label("Rf")
        else:
            flow.Start().label("request")
            flow.Arrow().down()
            decision = flow.Decision(w=5, h=3.5, E="diagram", S="other").label("image kind?")
            flow.Arrow().down()
            flow.Box(w=5).label("Qwen2.5-VL")
            flow.Arrow().down()
            flow.Decision(w=5, h=3.5, S="low", E="high").label("confidence")
            flow.Arrow().down()
            flow.Box(w=5).label("Pixtral")
            flow.Arrow().right().at(decision.E).length(3)
            flow.Box(w=4).label("Pixtral")
        buffer = io.BytesIO(drawing.get_imagedata("png"))
    image = Image.open(buffer)
    canvas = Image.new("RGB", image.size, "white")  # transparent background onto white, as a page shows it
    canvas.paste(image, mask=image.getchannel("A") if "A" in image.getbands() else None)
    return canvas


def _diagrams() -> dict[str, Callable[[], Image.Image]]:
    diagrams = _charts()
    diagrams.update({f"graph_{kind}": (lambda kind=kind: _graph(kind)) for kind in ("tree", "karate", "grid")})
    diagrams.update({kind: (lambda kind=kind: _schematic(kind)) for kind in ("rc_circuit", "amplifier", "flowchart")})
    return diagrams


SOURCES: dict[ImageKind, Callable[[], dict[str, Callable[[], Image.Image]]]] = {
    ImageKind.PHOTO: _photos, ImageKind.DOCUMENT: _documents, ImageKind.DIAGRAM: _diagrams,
}


def build(directory: Path = DEFAULT_DIRECTORY) -> list[tuple[Path, ImageKind]]:
    corpus = []
    for kind, source in SOURCES.items():
        folder = directory / kind.value
        folder.mkdir(parents=True, exist_ok=True)
        for name, make in source().items():
            path = folder / f"{name}.png"
            if not path.exists():
                make().convert("RGB").save(path)
            corpus.append((path, kind))
    return corpus


def main(argv: list[str] | None = None) -> int:
    directory = Path(argv[0]) if argv else DEFAULT_DIRECTORY
    corpus = build(directory)
    for kind in SOURCES:
        print(f"{kind.value}: {sum(1 for _, k in corpus if k == kind)} images in {directory / kind.value}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
