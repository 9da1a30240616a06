"""Emoji world: curation, rendering, scenes and captions, dataset files, object finder, EmojiEval.

Needs the Noto Color Emoji font (Debian: fonts-noto-color-emoji) and the `emoji` package; skipped
without them. The classifier used here is tiny and trained in the test for a few seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("emoji")
torch = pytest.importorskip("torch")

from training_tools.emoji_world import render  # noqa: E402

try:
    render.font_path()
except render.FontNotFoundError:
    pytest.skip("Noto Color Emoji font not installed", allow_module_level=True)

from training_tools.emoji_world.classifier import (  # noqa: E402
    ClassifierConfig,
    TrainSettings,
    load_classifier,
    save_classifier,
    train_classifier,
)
from training_tools.emoji_world.compose import (  # noqa: E402
    CANONICAL,
    KINDS,
    SceneRequest,
    article,
    caption_for,
    make_scene,
    plural,
    relation_holds,
    sample_request,
)
from training_tools.emoji_world.curation import (  # noqa: E402
    INCLUDED,
    candidate_emoji,
    curate,
    is_excluded,
    load_classes,
    save_classes,
)
from training_tools.emoji_world.dataset_builder import (  # noqa: E402
    BuildConfig,
    build,
    draw_example,
    read_metadata,
)
from training_tools.emoji_world.eval import (  # noqa: E402
    CATEGORIES,
    PromptSpec,
    evaluate,
    frechet_distance,
    make_prompts,
    render_blank,
    render_noise,
    render_real,
    score,
)
from training_tools.emoji_world.finder import estimate_background, find_objects  # noqa: E402

NUM_CLASSES = 8


@pytest.fixture(scope="module")
def classes() -> list:
    return curate(NUM_CLASSES, seed=3, include=())  # the farthest-point picks: the most distinct


def _box_iou(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


# --- curation --------------------------------------------------------------------------------


def test_curation_is_deterministic_and_distinct_per_seed(classes: list) -> None:
    again = curate(NUM_CLASSES, seed=3, include=())
    assert again == classes
    assert {c.name for c in curate(NUM_CLASSES, seed=3)} <= set(INCLUDED)  # the README's objects first
    assert len({c.name for c in classes}) == NUM_CLASSES
    # With room beyond the included emoji the seed decides the rest; without includes, all of it.
    assert [c.name for c in curate(NUM_CLASSES, seed=4, include=())] != [
        c.name for c in curate(NUM_CLASSES, seed=3, include=())
    ]
    wider = [c.name for c in curate(24, seed=3)]
    assert set(INCLUDED) <= set(wider)
    assert wider != [c.name for c in curate(24, seed=4)]
    for cls in classes:
        assert render.glyph_sprite(cls.char) is not None
        assert len(cls.backgrounds) >= 4 and set(cls.backgrounds) <= set(render.PALETTE)
        assert all(alias != cls.name for alias in cls.aliases)


@pytest.mark.parametrize(
    ("char", "name"),
    [
        ("\U0001f1fa\U0001f1f8", "flag: united states"),
        ("\U0001f44d\U0001f3fd", "thumbs up: medium skin tone"),
        ("1\ufe0f\u20e3", "keycap: 1"),
        ("\U0001f46a", "family"),
        ("\u2753", "red question mark"),
        ("\U0001f3c1", "chequered flag"),
        ("\U0001f1fa", "regional indicator u"),
    ],
)
def test_excluded_kinds(char: str, name: str) -> None:
    assert is_excluded(char, name)


def test_candidates_hold_no_flags_skin_tones_or_keycaps() -> None:
    assert not is_excluded("\U0001f34e", "red apple")
    for cand in candidate_emoji():
        codepoints = [ord(c) for c in cand.char if c != "\ufe0f"]
        assert len(codepoints) == 1
        assert not 0x1F1E6 <= codepoints[0] <= 0x1F1FF
        assert not 0x1F3FB <= codepoints[0] <= 0x1F3FF
        assert "flag" not in cand.name and "keycap" not in cand.name


def test_class_list_round_trip(classes: list, tmp_path) -> None:
    save_classes(classes, tmp_path / "classes.json", seed=3)
    assert load_classes(tmp_path / "classes.json") == classes


# --- rendering, scenes, captions ---------------------------------------------------------------


def test_render_variant_is_a_nonblank_128px_image(classes: list) -> None:
    rng = np.random.default_rng(0)
    image, box = render.render_variant(classes[0].char, rng, classes[0].backgrounds[0])
    assert image.shape == (128, 128, 3) and image.dtype == np.uint8
    x0, y0, x1, y1 = box
    assert 0 <= x0 < x1 <= 128 and 0 <= y0 < y1 <= 128
    assert max(x1 - x0, y1 - y0) >= 50
    inside = image[y0:y1, x0:x1].reshape(-1, 3).astype(int)
    bg = np.asarray(render.PALETTE[classes[0].backgrounds[0]])
    assert np.mean(np.abs(inside - bg).sum(1) > 60) > 0.2  # the glyph is drawn, not just background


def test_words() -> None:
    assert article("apple") == "an" and article("unicorn") == "a" and article("dog") == "a"
    assert plural("red apple") == "red apples"
    assert plural("cup with straw") == "cups with straw"
    assert plural("fox") == "foxes" and plural("cherry") == "cherries" and plural("beans") == "beans"
    assert plural("goose") == "geese"


def test_captions_match_specs(classes: list) -> None:
    rng = np.random.default_rng(1)
    a, b, c = 0, 1, 2
    bg = next(x for x in render.PALETTE if all(x in classes[i].backgrounds for i in (a, b, c)))
    n = lambda i: classes[i].name  # noqa: E731
    cases = {
        SceneRequest("single", (a,), bg): f"{article(n(a))} {n(a)} on {article(bg)} {bg} background",
        SceneRequest("count", (a, a, a), bg): f"three {plural(n(a))} on {article(bg)} {bg} background",
        SceneRequest("position", (a, b), bg, "left_of"): (
            f"{article(n(a))} {n(a)} to the left of {article(n(b))} {n(b)} on {article(bg)} {bg} background"
        ),
        SceneRequest("position", (a, b), bg, "above"): (
            f"{article(n(a))} {n(a)} above {article(n(b))} {n(b)} on {article(bg)} {bg} background"
        ),
        SceneRequest("row", (a, b, c), bg, "row"): (
            f"{article(n(a))} {n(a)}, {article(n(b))} {n(b)} and {article(n(c))} {n(c)} in a row"
            f" on {article(bg)} {bg} background"
        ),
    }
    for request, expected in cases.items():
        image, spec = make_scene(request, classes, rng, CANONICAL, mention_background=True)
        assert spec.text == expected
        assert [o.class_index for o in spec.objects] == list(request.class_indices)
        assert spec.background == bg and image.shape == (128, 128, 3)
    assert caption_for(SceneRequest("single", (a,), bg), classes, rng, mention_background=False) == (
        f"{article(n(a))} {n(a)}"
    )


def test_layouts_keep_their_relations(classes: list) -> None:
    rng = np.random.default_rng(2)
    for _ in range(20):
        _, spec = make_scene(sample_request("position", classes, rng), classes, rng)
        a, b = (o.bbox for o in spec.objects)
        assert relation_holds(a, b, str(spec.relation))
        _, row = make_scene(sample_request("row", classes, rng), classes, rng)
        boxes = [o.bbox for o in row.objects]
        assert relation_holds(boxes[0], boxes[1], "left_of") and relation_holds(boxes[1], boxes[2], "left_of")
        for box in boxes:
            assert 0 <= box[0] < box[2] <= 128 and 0 <= box[1] < box[3] <= 128


def test_metadata_round_trip_and_worker_independence(classes: list, tmp_path) -> None:
    config = BuildConfig(num_images=10, seed=5, num_classes=NUM_CLASSES, class_seed=3)
    summary = build(tmp_path / "one", config, classes=classes)
    assert summary["num_images"] == 10
    records = read_metadata(tmp_path / "one")
    first = json.loads((tmp_path / "one" / "metadata.jsonl").read_text().splitlines()[0])
    assert {"file_name", "text", "kind", "objects", "background", "relation"} <= set(first)
    for index, (file_name, spec) in enumerate(records):
        image, expected = draw_example(index, config, classes)
        assert spec == expected
        from PIL import Image

        assert np.array_equal(np.asarray(Image.open(tmp_path / "one" / file_name)), image)
    build(tmp_path / "two", config, classes=classes, workers=2)
    assert (tmp_path / "two" / "metadata.jsonl").read_bytes() == (
        tmp_path / "one" / "metadata.jsonl"
    ).read_bytes()
    assert {s.kind for _, s in records} <= set(KINDS)


# --- finder ------------------------------------------------------------------------------------


def test_finder_sees_two_objects_left_and_right_and_the_background(classes: list) -> None:
    rng = np.random.default_rng(3)
    for relation in ("left_of", "right_of"):
        bg = next(x for x in classes[0].backgrounds if x in classes[1].backgrounds)
        image, spec = make_scene(SceneRequest("position", (0, 1), bg, relation), classes, rng)
        background = estimate_background(image)
        assert background.color == bg
        boxes = find_objects(image, background)
        assert len(boxes) == 2
        truth = [o.bbox for o in spec.objects]
        # match each true box to its found box, then the relation must hold between the found ones
        found = [max(boxes, key=lambda b, t=t: _box_iou(b, t)) for t in truth]
        assert all(_box_iou(f, t) > 0.8 for f, t in zip(found, truth, strict=True))
        assert relation_holds(found[0], found[1], relation)
        assert not relation_holds(found[1], found[0], relation)


def test_finder_counts_copies_and_ignores_blank_and_noise(classes: list) -> None:
    rng = np.random.default_rng(4)
    for n in (1, 2, 3, 4):
        image, _ = make_scene(SceneRequest("count", (2,) * n, classes[2].backgrounds[0]), classes, rng)
        assert len(find_objects(image)) == n
    blank = render_blank(1)[0]
    assert find_objects(blank) == [] and estimate_background(blank).color is None
    assert estimate_background(render_noise(1)[0]).color is None


def test_frechet_distance() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 4))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shifted = frechet_distance(a, a + np.array([2.0, 0, 0, 0]))
    assert shifted == pytest.approx(4.0, rel=1e-6)
    assert frechet_distance(a, rng.normal(size=(400, 4)) * 3) > 5.0


# --- EmojiEval ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_classifier(classes: list, tmp_path_factory) -> str:
    settings = TrainSettings(
        crops_per_class=32, heldout_per_class=6, epochs=5, batch_size=64, lr=1e-2, threads=1, bf16=False
    )
    config = ClassifierConfig(num_classes=len(classes), input_size=32, widths=(16, 32, 48, 64))
    model, metrics = train_classifier(classes, settings, config)
    assert metrics["heldout_accuracy"] > 0.8, metrics
    out = tmp_path_factory.mktemp("cls")
    save_classifier(out, model, classes, metrics)
    return str(out)


def test_a_classifier_is_saved_into_place_and_never_over_other_files(
    classes: list, tiny_classifier: str, tmp_path: Path
) -> None:
    """Saved again over itself (a retrained classifier) it is replaced; a folder that holds anything
    else is refused, not deleted."""
    from snapgen_app.errors import ConfigError

    model, loaded = load_classifier(tiny_classifier)
    again = tmp_path / "again"
    save_classifier(again, model, loaded, {"heldout_accuracy": 1.0})
    save_classifier(again, model, loaded, {"heldout_accuracy": 0.5})
    assert json.loads((again / "metrics.json").read_text()) == {"heldout_accuracy": 0.5}
    assert not list(tmp_path.glob(".*partial"))
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds other files"):
        save_classifier(work, model, loaded, {})
    assert (work / "notes.txt").read_text() == "mine"


def test_eval_scores_real_renders_high_and_blank_or_noise_low(classes: list, tiny_classifier: str) -> None:
    model, loaded = load_classifier(tiny_classifier)
    assert loaded == classes
    prompts = make_prompts(classes, per_category=4)
    assert [p.category for p in prompts] == [c for c in CATEGORIES for _ in range(4)]
    assert prompts == make_prompts(classes, per_category=4)  # fixed set
    assert sorted(p.count for p in prompts if p.category == "counting") == [1, 2, 3, 4]
    real = score(
        render_real(prompts, classes, seed=1), prompts, model, reference=render_real(prompts, classes)
    )
    assert real.per_category["background"] == 1.0
    assert real.overall >= 0.8, real.per_category
    blank = score(render_blank(len(prompts)), prompts, model)
    assert blank.overall == 0.0
    noise = score(render_noise(len(prompts)), prompts, model, reference=render_real(prompts, classes))
    assert noise.overall <= 0.2
    assert noise.frechet_distance is not None and real.frechet_distance is not None
    assert noise.frechet_distance > 5 * real.frechet_distance
    # Per prompt: what was asked and what was seen, in prompt order.
    rows = real.prompt_results(prompts, classes)
    assert [r["text"] for r in rows] == [p.text for p in prompts]
    assert [r["correct"] for r in rows] == list(real.correct)
    single = [(p, r) for p, r in zip(prompts, rows, strict=True) if p.category == "single_object"]
    for prompt, row in single:
        assert (classes[prompt.classes[0]].name in row["seen_objects"]) == row["correct"]
    assert all(r["seen_objects"] == [] and not r["correct"] for r in blank.prompt_results(prompts, classes))


def test_evaluate_calls_the_generator_with_texts_and_seeds(classes: list, tiny_classifier: str) -> None:
    prompts = make_prompts(classes, per_category=2)
    calls: list[tuple[list[str], list[int]]] = []

    def generate(texts: list[str], seeds: list[int]) -> list[np.ndarray]:
        calls.append((texts, seeds))
        return render_blank(len(texts))

    report = evaluate(generate, tiny_classifier, prompts=prompts, batch_size=4, with_frechet=False)
    assert [t for texts, _ in calls for t in texts] == [p.text for p in prompts]
    assert [s for _, seeds in calls for s in seeds] == [p.seed for p in prompts]
    assert report.overall == 0.0 and set(report.per_category) == set(CATEGORIES)


def test_prompt_spec_rejects_unknown_fields() -> None:
    from snapgen_app.errors import ConfigError

    with pytest.raises(ConfigError):
        PromptSpec.from_dict(
            {"category": "single_object", "text": "a dog", "seed": 1, "classes": [0], "oops": 1}
        )
    with pytest.raises(ConfigError):
        PromptSpec("colour", "a dog", 1, (0,))
