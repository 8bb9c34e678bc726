import gzip
import struct

import numpy as np
import pytest

import data


def solid_digits(values):
    """Digits that are solid squares of a given grey level: their label is readable from the pixels."""
    imgs = np.stack([np.full((28, 28), v, np.uint8) for v in values])
    labels = np.arange(len(values))
    return data.Digits(imgs, labels, imgs, labels, "solid squares")


def test_digits_stay_inside_canvas_and_move_at_speed():
    d = solid_digits([255])
    cfg = data.MovingMNISTConfig(frames=60, num_digits=1, speed=5.0)
    video, _ = data.moving_mnist(20, d, cfg=cfg, seed=3)
    # a digit cut by the border would light fewer than 28*28 pixels
    assert ((video == 255).sum((2, 3)) == 28 * 28).all()
    ys, xs = np.nonzero(video[0, 0] == 255)
    assert ys.min() >= 0 and ys.max() < 64 and xs.max() < 64
    # the centre moves about `speed` px per frame (less at a bounce)
    c = np.array([[np.argwhere(f == 255).mean(0) for f in clip] for clip in video])
    step = np.linalg.norm(np.diff(c, axis=1), axis=-1)
    assert step.max() <= 5.0 + 1.5 and np.median(step) > 4.0


def test_same_seed_same_clip_other_seed_other_clip(digits):
    a, la = data.moving_mnist(4, digits, seed=7)
    b, lb = data.moving_mnist(4, digits, seed=7)
    c, _ = data.moving_mnist(4, digits, seed=8)
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    assert not np.array_equal(a, c)
    assert a.shape == (4, 20, 64, 64) and a.dtype == np.uint8


def test_labels_name_the_digits_shown():
    values = [10 + 20 * i for i in range(10)]
    d = solid_digits(values)
    video, labels = data.moving_mnist(30, d, cfg=data.MovingMNISTConfig(num_digits=1, frames=3), seed=0)
    assert np.array_equal(video.max((1, 2, 3)), np.array(values)[labels[:, 0]])


def test_labels_list_the_digits_left_to_right():
    """The prompt says which digit is where: labels[:, 0] is the digit whose box starts leftmost in frame 0."""
    values = [10 + 20 * i for i in range(10)]
    video, labels = data.moving_mnist(200, solid_digits(values), cfg=data.MovingMNISTConfig(num_digits=2, frames=2),
                                      seed=0)
    first = video[:, 0]                                        # [n,64,64]
    x0 = (first > 0).any(1).argmax(1)                          # leftmost column with ink
    column = first[np.arange(200), :, x0]                      # [n,64]; both digits may start there (a tie)
    assert (column == np.array(values)[labels[:, 0], None]).any(1).all()


def test_train_and_heldout_digits_are_disjoint(digits):
    tr = {im.tobytes() for im in digits.train_images[:2000]}
    assert not any(im.tobytes() in tr for im in digits.test_images[:500])


def test_idx_reader_and_synthetic_fallback(tmp_path, monkeypatch):
    imgs = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">HBB", 0, 8, 3) + struct.pack(">III", 2, 28, 28) + imgs.tobytes())
    assert np.array_equal(data.read_idx(tmp_path / "t10k-images-idx3-ubyte.gz"), imgs)
    monkeypatch.setattr(data, "SHARED_MNIST", tmp_path / "nowhere")
    with pytest.warns(UserWarning, match="NOT real MNIST"):
        d = data.load_digits(tmp_path / "empty", download=False)
    assert d.source.startswith("synthetic") and d.train_images.shape[1:] == (28, 28)
    assert set(d.test_labels) == set(range(10))


def test_mnist_test_seq_loader(tmp_path):
    x = np.random.default_rng(0).integers(0, 255, (20, 3, 64, 64), dtype=np.uint8)
    np.save(tmp_path / "mnist_test_seq.npy", x)
    y = data.load_mnist_test_seq(tmp_path / "mnist_test_seq.npy")
    assert y.shape == (3, 20, 64, 64) and np.array_equal(y[1, 5], x[5, 1])
    np.save(tmp_path / "bad.npy", x.astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        data.load_mnist_test_seq(tmp_path / "bad.npy")


def test_clip_folder(tmp_path, digits):
    video, _ = data.moving_mnist(2, digits, cfg=data.MovingMNISTConfig(frames=12, size=32, digit_size=14), seed=0)
    np.save(tmp_path / "a.npy", video)                  # [N,T,H,W]
    data.save_gif(tmp_path / "b.gif", video[:1], scale=1)
    clips = data.load_clip_folder(tmp_path, frames=5, size=64)
    assert clips.shape == (2 * 2 + 2, 5, 64, 64) and clips.dtype == np.uint8
    with pytest.raises(FileNotFoundError, match="no .npy"):
        data.load_clip_folder(tmp_path / "empty", frames=5, size=64)
    (tmp_path / "c.gif").write_bytes(b"not a gif")
    with pytest.raises(ValueError, match="c.gif"):
        data.load_clip_folder(tmp_path, frames=5, size=64)


def gif_clip():
    """A white square moving on black after a first frame holding every grey level: such a frame gets a palette
    that Pillow reads as plain greyscale ('L'), and the later frames, which bring palettes of their own, broke."""
    v = np.zeros((4, 16, 16), np.uint8)
    v[0] = np.arange(256).reshape(16, 16)
    for t in range(1, 4):
        v[t, 3 * t:3 * t + 5, 4:9] = 255
    return v


def write_pillow_palette_gif(path, v):
    from PIL import Image
    frames = [Image.fromarray(f).convert("P") for f in v]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)


def write_rgb_gif(path, v):
    import imageio.v3 as iio
    iio.imwrite(path, v, duration=100, loop=0)


GIF_WRITERS = {  # name: (write(path, clip), clip as written, channels to load, largest error allowed)
    "save_gif": (lambda p, v: data.save_gif(p, v[None], scale=1), gif_clip(), 1, 0),
    "save_gif_scale2": (lambda p, v: data.save_gif(p, v[None], scale=2), gif_clip(), 1, 64),
    "pillow_palette": (write_pillow_palette_gif, gif_clip(), 1, 0),
    "rgb": (write_rgb_gif, np.stack([gif_clip(), np.zeros_like(gif_clip()), 255 - gif_clip()], -1), 3, 0),
}


@pytest.mark.parametrize("name", GIF_WRITERS)
def test_clip_folder_reads_back_gifs(tmp_path, name):
    """A GIF is one clip: load_clip_folder(frames=T, size=H) gives back what was written. GIF frames hold up to 256
    colours, so these clips (grey levels; 256 colours in the RGB one) survive exactly, except that save_gif's `scale`
    upsampling comes back through an antialiased downsampling, which blurs the square's edges by under a quarter."""
    write, want, channels, tol = GIF_WRITERS[name]
    write(tmp_path / "x.gif", want)
    got = data.load_clip_folder(tmp_path, frames=4, size=16, channels=channels)
    assert got.dtype == np.uint8 and got.shape == (1, *want.shape)
    err = np.abs(got[0].astype(int) - want)
    assert err.max() <= tol, f"{name}: pixels off by up to {err.max()}"
    assert (got[0][want == 255] >= 160).all() and (got[0][want == 0] <= 64).all()  # bright stays bright, dark dark


def test_conversions_check_their_input():
    v = np.zeros((2, 5, 8, 8), np.uint8)
    x = data.to_model(v)
    assert x.shape == (2, 1, 5, 8, 8) and x.min() == -1
    assert np.array_equal(data.from_model(x), v)
    with pytest.raises(TypeError, match="uint8"):
        data.to_model(v.astype(np.float32))
    with pytest.raises(ValueError, match="shape"):
        data.to_model(np.zeros((5, 8, 8), np.uint8))


def test_command_writes_clips_and_their_digits(tmp_path):
    from eval import read_prompts
    data.main(["--npy", str(tmp_path / "c.npy"), "--num", "3", "--frames", "5", "--gif", str(tmp_path / "c.gif")])
    video = np.load(tmp_path / "c.npy")
    assert video.shape == (3, 5, 64, 64) and video.dtype == np.uint8 and (tmp_path / "c.gif").exists()
    again, labels = data.moving_mnist(3, data.load_digits(download=False), "test", data.MovingMNISTConfig(frames=5))
    assert np.array_equal(video, again) and read_prompts(tmp_path / "c.txt") == labels.tolist()
