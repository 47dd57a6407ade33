"""Box parsing on real Qwen-VL answer strings, the synthetic generator, and the grounding TSV reader."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from ivcprune.boxes import iou, parse_box, parse_qwen2_box, parse_qwen25_box
from ivcprune.evals import synth
from ivcprune.evals.grounding_data import GroundingItem, read_grounding_tsv, write_grounding_tsv


@pytest.mark.parametrize(
    "text,box",
    [
        ('```json\n[\n\t{"bbox_2d": [135, 114, 1016, 672], "label": "dog"}\n]\n```', (135, 114, 1016, 672)),
        ('{"bbox_2d": [12, 30, 200, 310]}', (12, 30, 200, 310)),
        ('[{"bbox_2d": [5, 6, 7, 8], "label": "a"}, {"bbox_2d": [1, 2, 3, 4], "label": "b"}]', (5, 6, 7, 8)),
        ('The man is at {"bbox_2d": [40, 50, 140, 250], "label": "man"} in the picture.', (40, 50, 140, 250)),
        ('```json\n[{"bbox_2d": [100, 200, 300, 400], "label": "cup"', (100, 200, 300, 400)),  # cut off
        ('{"bbox_2d": [300, 40, 100, 80]}', (100, 40, 300, 80)),  # corners swapped
        ('[10.5, 20, 30.25, 40]', (10.5, 20, 30.25, 40)),
    ],
)
def test_parse_qwen25_answers(text, box):
    assert parse_qwen25_box(text) == pytest.approx(box)


@pytest.mark.parametrize(
    "text",
    ["", "I cannot find it.", '{"bbox_2d": [1, 2, 3]}', '```json\n[{"label": "dog"}]\n```', '{"bbox_2d": "none"}',
     None],
)
def test_parse_qwen25_malformed(text):
    assert parse_qwen25_box(text) is None


@pytest.mark.parametrize(
    "text,box",
    [
        ("<|object_ref_start|>the dog<|object_ref_end|><|box_start|>(69,306),(250,988)<|box_end|><|im_end|>",
         (69, 306, 250, 988)),
        ("(120,45),(300,600)", (120, 45, 300, 600)),
        ("<|box_start|>( 10 , 20 ),( 30 , 40 )<|box_end|>", (10, 20, 30, 40)),
    ],
)
def test_parse_qwen2_answers(text, box):
    assert parse_qwen2_box(text) == pytest.approx(box)
    assert parse_box(text, "box_tokens") == pytest.approx(box)


@pytest.mark.parametrize("text", ["<|box_start|>(69,306)<|box_end|>", "no box", '{"bbox_2d": [1, 2, 3, 4]}'])
def test_parse_qwen2_malformed(text):
    assert parse_qwen2_box(text) is None


def test_iou():
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert iou(None, (0, 0, 1, 1)) == 0.0
    assert iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0


def test_synthetic_is_deterministic_and_splits_differ():
    a, b = synth.make_sample(0, "test", 3), synth.make_sample(0, "test", 3)
    assert (a.ref, a.box, a.kind) == (b.ref, b.box, b.kind)
    assert a.image.tobytes() == b.image.tobytes()
    assert a.image.size == (448, 448)
    train = {synth.make_sample(0, "train", i).image.tobytes()[:4096] for i in range(20)}
    test = {synth.make_sample(0, "test", i).image.tobytes()[:4096] for i in range(20)}
    assert not train & test
    assert synth.make_sample(1, "test", 3).image.tobytes() != a.image.tobytes()
    with pytest.raises(ValueError):
        synth.make_sample(0, "dev", 0)


def test_synthetic_expressions_are_unambiguous():
    kinds = set()
    for i in range(60):
        s = synth.make_sample(0, "val", i)
        kinds.add(s.kind)
        target = [o for o in s.objects if o.box == s.box]
        assert len(target) == 1
        # the expression must single out exactly one object: no other object gets the same expression
        exprs = [synth._expressions(s.objects, o) for o in s.objects]
        same = [o for o, e in zip(s.objects, exprs) if e.get(s.kind) == s.ref]
        assert same == target
        assert s.answer == '{"label": "%s", "bbox_2d": [%d, %d, %d, %d]}' % (target[0].label, *s.box)
        assert parse_qwen25_box(s.answer) == s.box
        x1, y1, x2, y2 = s.box
        assert 0 <= x1 < x2 <= 448 and 0 <= y1 < y2 <= 448
    assert kinds == {"attribute", "size", "relation", "ordinal"}


def _b64(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_tsv_roundtrip_frames_and_malformed_rows(tmp_path):
    items = [GroundingItem(id=str(i), image=Image.new("RGB", (300 + 10 * i, 200), (i, 0, 0)), ref=f"thing {i}",
                           box=(10.0 + i, 20.0, 110.0, 150.0)) for i in range(3)]
    path = write_grounding_tsv(tmp_path / "g.tsv", items)
    got = list(read_grounding_tsv(path))
    assert [g.id for g in got] == ["0", "1", "2"]
    assert got[1].box == pytest.approx(items[1].box) and got[1].ref == "thing 1"
    assert got[2].image.size == (320, 200)
    # the authors' Qwen2.5-VL variant: boxes scaled to sides rounded to multiples of 28
    path28 = write_grounding_tsv(tmp_path / "g28.tsv", items, gt_frame="resized28")
    raw = path28.read_text().splitlines()[1].split("\t")
    assert raw[3] == "10.2667 19.6 112.933 147"  # 300 -> 308 wide, 200 -> 196 high
    back = list(read_grounding_tsv(path28, gt_frame="resized28"))
    assert back[0].box == pytest.approx(items[0].box, abs=1e-3)
    # image paths instead of base64
    pathp = write_grounding_tsv(tmp_path / "p" / "g.tsv", items, image_paths=True)
    assert [g.image.size for g in read_grounding_tsv(pathp)] == [(300, 200), (310, 200), (320, 200)]
    # malformed rows are reported with their index, counted, skipped
    good = _b64(Image.new("RGB", (64, 64)))
    lines = [
        "index\timage\tquestion\tanswer\twidth\theight",
        f"a\t{good}\tthe cat\t1 2 30 40\t64\t64",
        "b\tnot-an-image\tthe dog\t1 2 3 4\t64\t64",
        f"c\t{good}\tthe cup\t1 2 3\t64\t64",
        f"d\t{good}\t\t1 2 3 4\t64\t64",
        f"e\t{good}\tthe hat\t1 2 3 4\t99\t64",
        f"f\t{good}\tthe box\t5 5 5 9\t64\t64",
        f"g\t{good}\tthe pen\t1 2 30 40 5 6 50 60\t64\t64",
    ]
    bad = tmp_path / "bad.tsv"
    bad.write_text("\n".join(lines) + "\n")
    skipped = []
    ok = list(read_grounding_tsv(bad, skipped=skipped))
    assert [g.id for g in ok] == ["a", "g"] and ok[1].box == (1, 2, 30, 40)
    assert [s.index for s in skipped] == ["b", "c", "d", "e", "f"]
    assert "width/height" in skipped[3].reason and "empty box" in skipped[4].reason
    with pytest.raises(ValueError, match="missing columns"):
        (tmp_path / "x.tsv").write_text("a\tb\n1\t2\n")
        list(read_grounding_tsv(tmp_path / "x.tsv"))
