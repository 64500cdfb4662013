"""predict.py: MNIST's own preparation of a digit on a page (drawn here: ink or chalk, anywhere, any
size, uneven light, transparent, 16-bit, JPEG, huge, blank), --top, --show, folders, per-file errors."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

import predict
from benchmarks.handwriting import draw_page
from conftest import ROOT, assert_usage_error, run_script, write_idx
from train_loop import DEFAULT_HPARAMS, load_mnist, retrain_on_train_and_val


def glyph(digit, rng, height=90):
    """A digit as a pen might write it, big, light on black (0-1): Pillow's own font at a random
    size, stroke width and slant. Unlike the tests' bars, its class is its shape, not its place."""
    size = int(rng.integers(height // 2, height))
    canvas = Image.new("L", (2 * height, 2 * height))
    ImageDraw.Draw(canvas).text((height // 2, height // 3), str(digit), fill=255, font=ImageFont.load_default(size=size),
                                stroke_width=int(rng.integers(1, size // 10 + 2)), stroke_fill=255)
    return np.asarray(canvas.rotate(rng.uniform(-15, 15), resample=Image.Resampling.BILINEAR), np.float32) / 255


def centred(ink):
    """The 28x28 frame MNIST would make of it."""
    return predict.mnist_like(ink)


@pytest.fixture(scope="module")
def glyphs(tmp_path_factory):
    """1,200 glyph digits made MNIST-style (28x28, centred), written as MNIST's files, and a model
    trained on the first 1,000: what a short study on such digits gives."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, size=1200)
    frames = np.stack([centred(glyph(label, rng)) for label in labels])
    root = tmp_path_factory.mktemp("glyphs")
    raw = root / "MNIST" / "raw"
    os.makedirs(raw)
    for prefix, part in (("train", slice(0, 1000)), ("t10k", slice(1000, 1200))):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", np.round(frames[part] * 255))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels[part])
    hparams = dict(DEFAULT_HPARAMS, learning_rate=0.05, hidden_size=128, layer_size=2, dropout=0.1, epochs=8)
    model = retrain_on_train_and_val(load_mnist(str(root), torch.device("cpu")), hparams, seed=0)
    torch.save({"state_dict": model.state_dict(), "hparams": hparams}, root / "best_model.pt")
    return frames[1000:], labels[1000:], str(root / "best_model.pt")


def assert_like_mnist(frame, reference):
    """Light ink on black, inside a 20x20 box, centre of mass at (14, 14), and the same digit."""
    rows, cols = np.nonzero(frame > 0.02)
    assert frame[0].max() == frame[-1].max() == frame[:, 0].max() == frame[:, -1].max() == 0  # black border
    assert frame.max() == 1 and frame.mean() < 0.35  # strong strokes on a mostly black frame
    assert max(rows.max() - rows.min(), cols.max() - cols.min()) + 1 <= 20
    mass_rows, mass_cols = np.indices(frame.shape)
    centre = (mass_rows * frame).sum() / frame.sum(), (mass_cols * frame).sum() / frame.sum()
    assert centre == pytest.approx((14, 14), abs=0.6)
    assert np.corrcoef(frame.ravel(), reference.ravel())[0, 1] > 0.8


def page_of(frame, case, rng):
    """`frame` (a centred digit) drawn on a page in one of the ways people hand digits over."""
    if case == "chalk on a dark board":
        return draw_page(frame, rng, chalk=True)
    page = draw_page(frame, rng)
    if case == "small, in a corner of a big page":
        big = Image.new("L", (1600, 1200), int(np.median(page)))
        big.paste(page.resize((200, 150)), (1350, 1020))
        return big
    if case == "transparent drawing (RGBA)":  # a paint program's export: black ink, transparent elsewhere
        rgba = np.zeros((300, 400, 4), np.uint8)
        top, left = rng.integers(0, 150, size=2)
        rgba[top:top + 150, left:left + 150, 3] = np.asarray(Image.fromarray(frame * 255).convert("L").resize(
            (150, 150), Image.Resampling.BICUBIC))  # how much ink: how opaque
        return Image.fromarray(rgba, "RGBA")
    if case == "16-bit scan":
        return Image.fromarray((np.asarray(page, np.float32) * 257).astype(np.uint16))
    return page


CASES = ["dark ink on light paper", "chalk on a dark board", "small, in a corner of a big page",
         "transparent drawing (RGBA)", "16-bit scan", "JPEG photo"]


@pytest.mark.parametrize("case", CASES)
def test_a_digit_on_a_page_is_prepared_as_mnist_prepares_its_digits(glyphs, tmp_path, case):
    frames, _, _ = glyphs
    rng = np.random.default_rng(CASES.index(case))
    for frame in frames[:5]:
        path = str(tmp_path / ("page.jpg" if case == "JPEG photo" else "page.png"))
        page_of(frame, case, rng).save(path)
        if case == "16-bit scan":
            assert Image.open(path).mode.startswith("I")
        assert_like_mnist(predict.prepare(path)[1], frame)


def test_the_model_reads_drawn_pages_about_as_well_as_the_same_digits_centred(glyphs, tmp_path):
    frames, labels, model_path = glyphs
    rng = np.random.default_rng(7)
    folder = tmp_path / "pages"
    os.makedirs(folder)
    for i, frame in enumerate(frames[:100]):
        page_of(frame, CASES[i % len(CASES)], rng).save(folder / f"{i:03d}.{'jpg' if i % 6 == 5 else 'png'}")
    result = run_script("predict.py", folder, "--model", model_path, "--top", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    answers = [int(line.split(": ")[1].split()[0]) for line in result.stdout.splitlines()]
    model = predict.load_model(model_path)
    on_pages = np.mean(np.array(answers) == labels[:100])
    as_centred = np.mean([answer[0][0] for answer in predict.classify(
        model, torch.stack([predict.to_input(frame) for frame in frames[:100]]), 1)] == labels[:100])
    assert as_centred > 0.8  # the model learned the glyphs
    assert on_pages >= as_centred - 0.05


def test_a_folder_with_an_unreadable_file_top_3_and_show(glyphs, tmp_path):
    frames, labels, model_path = glyphs
    folder, shown = tmp_path / "mine", tmp_path / "seen"
    os.makedirs(folder)
    rng = np.random.default_rng(3)
    for i in range(3):
        draw_page(frames[i], rng).save(folder / f"digit{i}.png")
    (folder / "notes.png").write_text("not an image")
    Image.new("L", (300, 200), 200).save(folder / "blank.png")
    result = run_script("predict.py", folder, "--model", model_path, "--show", shown, cwd=tmp_path)
    assert result.returncode == 2  # some failed, after all the others were classified
    errors = result.stderr.strip().splitlines()
    assert errors == [f"predict.py: error: {folder / 'blank.png'}: no digit found: the image is blank, or its ink "
                      "too faint", f"predict.py: error: {folder / 'notes.png'}: not an image (expected a PNG, "
                      "JPEG or other picture of one digit)"]
    lines = result.stdout.splitlines()
    assert [line.split(": ")[0] for line in lines] == [str(folder / f"digit{i}.png") for i in range(3)]
    for line in lines:  # "digit0.png: 7 (0.912), 1 (0.051), 9 (0.020)": the 3 likeliest, likeliest first
        top = [(int(item.split()[0]), float(item.split("(")[1].rstrip(")"))) for item in line.split(": ")[1].split(", ")]
        assert len(top) == 3 and len({digit for digit, _ in top}) == 3
        assert 1 >= top[0][1] >= top[1][1] >= top[2][1] >= 0
    assert sorted(os.listdir(shown)) == ["digit0.png", "digit1.png", "digit2.png"]
    with Image.open(shown / "digit0.png") as picture:  # the page beside the 28x28 input, 8 times as big
        assert picture.height >= 28 * predict.SHOW_SCALE and picture.width > 28 * predict.SHOW_SCALE * 2


def test_a_huge_photo_is_prepared_without_gigabytes(glyphs, tmp_path):
    frames, _, _ = glyphs
    page = draw_page(frames[0], np.random.default_rng(1)).resize((6000, 4000), Image.Resampling.BILINEAR)
    page.save(tmp_path / "huge.png")
    script = ("import resource, predict; before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
              f"_, frame = predict.prepare({str(tmp_path / 'huge.png')!r}); "
              "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024, frame.shape)")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    megabytes, shape = result.stdout.split(" ", 1)
    assert int(megabytes) < 300 and shape.strip() == "(28, 28)"  # a 6000x4000 page: 24 MB of pixels


@pytest.fixture(scope="module")
def model_path(mnist_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("predict") / "run"
    result = run_script("tune.py", "--data-dir", mnist_dir, "--out", out, "--n-trials", "3", "--epochs", "1",
                        "--device", "cpu", "--pruner", "none", cwd=out.parent)
    assert result.returncode == 0, result.stderr
    return str(out / "best_model.pt")


def test_test_images_with_their_labels(model_path, mnist_dir, tmp_path):
    result = run_script("predict.py", "--test", "20", "--data-dir", mnist_dir, "--model", model_path, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("(true ") == 20
    right = int(result.stdout.splitlines()[-1].split(" of ")[0])
    assert right >= 18  # the bars are easy: a model that learned gets nearly all


def test_bad_input_is_one_line_and_exit_2(model_path, tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    other = torch.load(model_path, weights_only=True)
    other["hparams"]["hidden_size"] += 1  # the weights no longer fit the model these hparams build
    torch.save(other, tmp_path / "other.pt")
    assert_usage_error(run_script("predict.py", tmp_path / "missing.png", "--model", model_path, cwd=tmp_path),
                       "missing.png", "no such file")
    assert_usage_error(run_script("predict.py", tmp_path / "notes.png", "--model", model_path, cwd=tmp_path),
                       "notes.png", "not an image")
    assert_usage_error(run_script("predict.py", tmp_path / "notes.png", "--model", tmp_path / "other.pt",
                                  cwd=tmp_path), "other.pt")
    assert_usage_error(run_script("predict.py", "--model", model_path, cwd=tmp_path), "--test")
    assert_usage_error(run_script("predict.py", "x.png", "--model", tmp_path / "none.pt", cwd=tmp_path), "none.pt")
    assert_usage_error(run_script("predict.py", "x.png", "--top", "11", "--model", model_path, cwd=tmp_path), "--top")
    assert os.path.exists(model_path)


def test_a_phone_photo_rotated_by_its_exif_tag_is_read_upright(glyphs, tmp_path):
    frames, _, _ = glyphs
    page = page_of(frames[0], "dark ink on light paper", np.random.default_rng(5))
    page.save(tmp_path / "upright.jpg", quality=95)
    # A phone keeps the sensor's pixels and adds "rotate 90 degrees clockwise to view" (orientation 6).
    exif = Image.Exif()
    exif[0x0112] = 6
    page.rotate(90, expand=True).save(tmp_path / "tagged.jpg", quality=95, exif=exif)
    _, upright = predict.prepare(str(tmp_path / "upright.jpg"))
    _, tagged = predict.prepare(str(tmp_path / "tagged.jpg"))
    assert np.abs(tagged - upright).mean() < 0.02  # the same digit, the same way up
    assert np.abs(np.rot90(upright) - upright).mean() > 0.05  # (turned, it would differ)
