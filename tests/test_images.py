"""The image reader: both layouts, labels and order, RGB conversion, bad files, the ADM center crop, errors."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from dit.data.images import BadImage, center_crop, find_images, load_image, load_images
from dit.errors import UserError
from tests.fake_imagenet import make_class_folders, make_fake_imagenet


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet100")
    return root, make_fake_imagenet(root)


def test_kaggle_train_finds_every_file_labelled_by_sorted_wnid(fake):
    root, info = fake
    images = find_images(root, "train")
    assert images.layout == "imagenet100" and images.split == "train"
    assert len(images) == info["train"]
    assert images.classes == tuple(info["classes"])
    assert images.names == info["names"]
    for path, label in images.files:
        assert path.parent.name == images.classes[label]
        assert path.parent.parent.name.startswith("train.X")
    # Sorted by (class, file name), and the hidden and non-image files are skipped.
    keys = [(label, path.name) for path, label in images.files]
    assert keys == sorted(keys)
    assert not any(path.name in (".DS_Store", "notes.txt") for path, _ in images.files)
    assert find_images(str(root)).files == images.files


def test_kaggle_val_uses_the_train_classes(fake):
    root, info = fake
    val = find_images(root, "val")
    assert val.layout == "imagenet100" and len(val) == info["val"]
    assert val.classes == find_images(root, "train").classes
    assert {label for _, label in val.files} == set(range(len(val.classes)))
    for path, label in val.files:
        assert path.parent.parent.name == "val.X" and path.parent.name == val.classes[label]


def test_load_images_reports_exactly_the_bad_files(fake):
    root, info = fake
    images = find_images(root)
    arrays, good, bad = load_images(images, range(len(images)), 24)
    assert {path: reason.split(" (")[0] for path, reason in bad} == info["bad"]
    assert arrays.shape == (len(images) - 2, 24, 24, 3) and arrays.dtype == np.uint8
    bad_indices = [i for i, (path, _) in enumerate(images.files) if path in info["bad"]]
    assert good.dtype == np.int64 and list(good) == [i for i in range(len(images)) if i not in bad_indices]
    # Each good row is what load_image gives for that file.
    for row, index in zip(arrays, good):
        np.testing.assert_array_equal(row, load_image(images.files[index][0], 24))


def test_load_images_keeps_the_order_it_was_asked_for(fake):
    root, _ = fake
    images = find_images(root)
    order = np.arange(len(images))[::-1]
    arrays, good, bad = load_images(images, order, 16, workers=3)
    assert list(good) == [i for i in order if images.files[i][0] not in {p for p, _ in bad}]
    forward, _, _ = load_images(images, np.sort(good), 16)
    np.testing.assert_array_equal(arrays, forward[::-1])
    empty, none, _ = load_images(images, [], 16)
    assert empty.shape == (0, 16, 16, 3) and none.shape == (0,)


def test_odd_real_world_files_load_as_rgb(fake):
    _, info = fake
    gray = load_image(info["odd"]["grayscale"], 16)
    assert gray.shape == (16, 16, 3) and gray.dtype == np.uint8
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 1], gray[..., 2])
    assert load_image(info["odd"]["cmyk"], 16).shape == (16, 16, 3)
    assert load_image(info["odd"]["png"], 16).shape == (16, 16, 3)


def test_other_modes_convert_to_rgb(tmp_path):
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 0  # fully transparent red: alpha is dropped, the colour stays
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(load_image(tmp_path / "rgba.png", 8), np.broadcast_to([200, 0, 0], (8, 8, 3)))
    Image.fromarray(np.full((20, 20), 0x8000, np.uint16)).save(tmp_path / "gray16.png")
    assert Image.open(tmp_path / "gray16.png").mode.startswith("I")
    # 16 bits scale to 8 (PIL's own convert would clip this to 255).
    np.testing.assert_array_equal(load_image(tmp_path / "gray16.png", 8), np.full((8, 8, 3), 128))
    Image.fromarray(rgba[..., :3]).convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "palette.bmp")
    assert Image.open(tmp_path / "palette.bmp").mode == "P"
    np.testing.assert_array_equal(load_image(tmp_path / "palette.bmp", 8), np.broadcast_to([200, 0, 0], (8, 8, 3)))


def test_bad_files_raise_bad_image_with_a_reason(tmp_path):
    (tmp_path / "text.jpg").write_text("hello, not a JPEG")
    (tmp_path / "empty.jpg").write_bytes(b"")
    for name, reason in [("text.jpg", "not an image"), ("empty.jpg", "empty file"), ("gone.jpg", "unreadable file")]:
        with pytest.raises(BadImage, match=reason):
            load_image(tmp_path / name, 8)


def test_center_crop_keeps_the_middle_rows_of_a_tall_image():
    # 64 wide, 192 high: no resize is needed, so the crop must be exactly the middle third.
    arr = np.zeros((192, 64, 3), np.uint8)
    arr[:64], arr[64:128], arr[128:] = [255, 0, 0], [0, 255, 0], [0, 0, 255]
    out = np.asarray(center_crop(Image.fromarray(arr), 64))
    np.testing.assert_array_equal(out, np.broadcast_to([0, 255, 0], (64, 64, 3)))


def test_center_crop_drops_a_side_border_and_keeps_the_centre():
    arr = np.full((200, 300, 3), 128, np.uint8)
    arr[:, :20] = [255, 0, 0]  # a red strip on the left edge
    arr[90:110, 140:160] = [0, 0, 255]  # a blue square in the middle
    out = np.asarray(center_crop(Image.fromarray(arr), 64))
    assert out.shape == (64, 64, 3)
    assert not np.any((out[..., 0] > 200) & (out[..., 1] < 60))  # no red left
    np.testing.assert_array_equal(out[32, 32], [0, 0, 255])


def test_center_crop_halves_large_images_with_box_first():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (768, 1024, 3), np.uint8))
    # By hand: 1024x768 -> BOX 512x384 (384 < 2*256 stops halving) -> BICUBIC 341x256 -> crop x from 42.
    halved = image.resize((512, 384), resample=Image.BOX)
    scaled = np.asarray(halved.resize((round(512 * 256 / 384), 256), resample=Image.BICUBIC))
    expected = scaled[:, (341 - 256) // 2: (341 - 256) // 2 + 256]
    np.testing.assert_array_equal(np.asarray(center_crop(image, 256)), expected)
    direct = np.asarray(image.resize((341, 256), resample=Image.BICUBIC))[:, 42:298]
    assert not np.array_equal(expected, direct)  # the BOX step matters, so the test above can fail


@pytest.mark.parametrize("size", [(8, 8), (17, 9), (9, 40), (100, 99), (600, 31)])
def test_center_crop_output_size(size):
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), np.uint8))
    assert center_crop(image, 16).size == (16, 16)


def test_center_crop_upsamples_small_images():
    digit = Image.fromarray(np.full((8, 8), 77, np.uint8))  # an 8x8 grayscale digit
    out = np.asarray(center_crop(digit, 16))
    assert out.shape == (16, 16)
    np.testing.assert_array_equal(out, 77)


def _expect_layout_error(root, split="train", *words):
    with pytest.raises(UserError) as caught:
        find_images(root, split)
    message = str(caught.value)
    for word in (str(root), "train.X1", "val.X", "Labels.json", "one folder per class", *words):
        assert word in message, (word, message)
    return message


def test_missing_root_is_a_clear_error(tmp_path):
    _expect_layout_error(tmp_path / "nowhere", "train", "does not exist")


def test_empty_folder_is_a_clear_error(tmp_path):
    _expect_layout_error(tmp_path, "train", "no images", "empty")


def test_images_without_class_folders_is_a_clear_error(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "lonely.jpg")
    _expect_layout_error(tmp_path, "train", "lonely.jpg")


def test_kaggle_tree_missing_a_train_part_is_a_clear_error(tmp_path):
    make_fake_imagenet(tmp_path, bad=False)
    shutil.rmtree(tmp_path / "train.X3")
    message = _expect_layout_error(tmp_path, "train", "lacks train.X3")
    assert "train.X2," not in message.split("lacks")[1].split(".")[0]
    _expect_layout_error(tmp_path, "val", "lacks train.X3")


def test_kaggle_class_in_two_train_parts_is_an_error(tmp_path):
    info = make_fake_imagenet(tmp_path, bad=False)
    wnid = info["classes"][0]
    source = next(tmp_path.glob(f"train.X*/{wnid}"))
    other = "train.X1" if source.parent.name != "train.X1" else "train.X2"
    shutil.copytree(source, tmp_path / other / wnid)
    with pytest.raises(UserError, match=f"{wnid} appears in both"):
        find_images(tmp_path)


def test_kaggle_val_class_missing_from_train_is_an_error(tmp_path):
    make_fake_imagenet(tmp_path, bad=False)
    shutil.copytree(next((tmp_path / "val.X").iterdir()), tmp_path / "val.X" / "n99999999")
    with pytest.raises(UserError, match="n99999999"):
        find_images(tmp_path, "val")
    assert len(find_images(tmp_path, "train").classes) == 5


def test_unknown_split_is_an_error(fake):
    with pytest.raises(UserError, match="train, val"):
        find_images(fake[0], "test")


def test_generic_class_folders_without_split(tmp_path):
    info = make_class_folders(tmp_path, classes=3, per_class=4)
    images = find_images(tmp_path)
    assert images.layout == "folders" and len(images) == info["count"]
    assert images.classes == tuple(info["classes"]) and images.names == {c: c for c in info["classes"]}
    assert [label for _, label in images.files] == [0] * 4 + [1] * 4 + [2] * 4
    assert {p.suffix for p, _ in images.files} == {".jpg", ".png"}
    with pytest.raises(UserError, match="no val folder"):
        find_images(tmp_path, "val")
    arrays, good, bad = load_images(images, range(len(images)), 8)
    assert arrays.shape == (12, 8, 8, 3) and not bad


def test_generic_class_folders_with_split(tmp_path):
    make_class_folders(tmp_path / "train", classes=3, per_class=4)
    make_class_folders(tmp_path / "val", classes=2, per_class=2)  # val may lack a class: labels come from train
    (tmp_path / "Labels.json").write_text(json.dumps({"class_a": "the first class"}))
    train, val = find_images(tmp_path, "train"), find_images(tmp_path, "val")
    assert train.layout == val.layout == "folders"
    assert len(train) == 12 and len(val) == 4
    assert train.classes == val.classes == ("class_a", "class_b", "class_c")
    assert train.names == {"class_a": "the first class", "class_b": "class_b", "class_c": "class_c"}
    assert all(path.parent.parent.name == "val" for path, _ in val.files)


def spy_on_jpeg_draft(monkeypatch) -> list:
    """The sizes JPEGs are decoded at when load_image asks for a reduced decode."""
    from PIL import JpegImagePlugin
    decoded, draft = [], JpegImagePlugin.JpegImageFile.draft

    def recording(self, mode, size):
        result = draft(self, mode, size)
        decoded.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", recording)
    return decoded


def test_a_large_jpeg_decodes_reduced_and_crops_like_the_full_decode(tmp_path, monkeypatch):
    from tests.fake_imagenet import random_image
    random_image(np.random.default_rng(0), (750, 500)).resize((6000, 4000)).save(tmp_path / "big.jpg", quality=90)
    random_image(np.random.default_rng(1), (300, 200)).save(tmp_path / "small.jpg", quality=90)
    decoded = spy_on_jpeg_draft(monkeypatch)
    crop = load_image(tmp_path / "big.jpg", 64)
    # 1/8 scale, 750x500: the short side is still >= 2 x 64, so center_crop's BOX halving comes next.
    assert crop.shape == (64, 64, 3) and decoded == [(750, 500)]
    with Image.open(tmp_path / "big.jpg") as image:
        full = np.asarray(center_crop(image.convert("RGB"), 64)).astype(int)
    assert np.abs(crop - full).mean() < 2
    # Ordinary photos decode in full, so their crops are exactly ADM's.
    with Image.open(tmp_path / "small.jpg") as image:
        np.testing.assert_array_equal(load_image(tmp_path / "small.jpg", 64), center_crop(image.convert("RGB"), 64))
    assert decoded == [(750, 500)]
