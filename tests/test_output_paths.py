"""Output paths (issue 18, items 3 and 8): an export or a prepare never deletes what it did not
write, on a disk or a bucket, and every bad output path is one line naming the key or argument.

Everything runs through `raylm.cli.main`, on real files, a real moto S3 server (the session's
`s3_server`) and, for `raylm prepare`, the session's local Ray cluster. A failure in the middle
of an upload is made by raylm's own `storage.write_bytes` raising for one file, after a real
second writer has put its object beside ours.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from hf_support import random_run
from raylm import storage
from raylm.cli import main as cli_main
from raylm.config import load_config
from raylm.data import prepared
from raylm.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
DEBUG = str(ROOT / "configs" / "debug.yaml")
BUCKET = "raylm-paths"


@pytest.fixture(scope="module")
def run(tmp_path_factory, tokenizer) -> Path:
    """A run directory with one complete checkpoint (random weights, the session's tokenizer)."""
    return random_run(tmp_path_factory.mktemp("run"), tokenizer)[0]


def one_line_error(args: list[str], capsys) -> str:
    """`raylm ARGS` exits 2 with exactly one line on stderr; that line."""
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("raylm: error: "), err
    return err


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def neighbour_of(out: Path) -> Path:
    """A user's folder named as the export's staging once was, with a file in it."""
    neighbour = out.with_name(f".{out.name}.partial")
    neighbour.mkdir(parents=True)
    (neighbour / "notes.txt").write_text("mine")
    return neighbour


# ---------------------------------------------------------------------------------------
# Item 3: staging that cannot delete a neighbour


def test_export_never_deletes_a_neighbouring_partial_directory(run, tmp_path, capsys):
    """`.OUT.partial/` present beforehand (a user's folder, another export in flight) survives an
    export to OUT with its files, and the export leaves no staging directory of its own."""
    out = tmp_path / "hf"
    neighbour = neighbour_of(out)
    assert cli_main(["export", str(run), "--out", str(out)]) == 0
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert files_under(neighbour) == {"notes.txt": b"mine"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hf.partial", "hf"]


def test_a_failed_export_removes_only_what_it_wrote(run, tmp_path, monkeypatch, capsys):
    """An export failing after its weights are written removes its own staging directory and the
    parent directories it made, nothing else: the neighbour `.OUT.partial/` keeps its files."""
    import raylm.use.hf as hf

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hf, "tokenizer_files", fail)  # after the weights, before the rename
    out = tmp_path / "new" / "deeper" / "hf"
    neighbour = neighbour_of(out)
    with pytest.raises(OSError, match="disk full"):
        cli_main(["export", str(run), "--out", str(out)])
    assert files_under(neighbour) == {"notes.txt": b"mine"}
    assert sorted(p.name for p in out.parent.iterdir()) == [".hf.partial"]


@pytest.fixture
def bucket(s3_server, monkeypatch) -> str:
    """s3://raylm-paths on the session's moto server, reached as any S3 endpoint is (environment)."""
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": s3_server}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    pafs.S3FileSystem(endpoint_override=s3_server.removeprefix("http://"), scheme="http",
                      allow_bucket_creation=True).create_dir(BUCKET)
    return f"s3://{BUCKET}"


def s3_files(prefix: str) -> dict[str, bytes]:
    """The objects under a prefix (pyarrow's empty "directory" markers are not files)."""
    fs, fs_path = storage.resolve(prefix)
    listing = fs.get_file_info(pafs.FileSelector(fs_path, recursive=True, allow_not_found=True))
    return {e.path[len(fs_path) + 1:]: storage.read_bytes(f"s3://{e.path}")
            for e in listing if e.type == pafs.FileType.File}


def second_writer_then_fail(monkeypatch, failing_name: str, foreign: str) -> set[str]:
    """raylm's `storage.write_bytes` of a file named `failing_name`: first a real second writer puts
    `foreign` beside it (after every existence check), then the upload fails. Returns the set that
    will hold the names of the objects under the prefix at that moment."""
    write, seen = storage.write_bytes, set()

    def write_bytes(path, data):
        if storage.is_uri(path) and storage.name_of(path) == failing_name:
            write(foreign, b"another writer's object")
            seen.update(s3_files(str(storage.parent_of(path))))
            raise OSError("connection reset by peer")
        return write(path, data)

    monkeypatch.setattr(storage, "write_bytes", write_bytes)
    return seen


def test_a_failed_export_to_s3_deletes_only_its_own_objects(run, bucket, monkeypatch, capsys):
    """An export's upload failing at config.json, after another writer put an object under the
    prefix, deletes exactly the objects the export wrote: the other writer's object survives. With
    that object gone, the prefix (pyarrow's empty markers aside) takes a new export."""
    out = f"{bucket}/failed-export"
    foreign = f"{out}/theirs/keep.bin"
    with monkeypatch.context() as patch:
        seen = second_writer_then_fail(patch, "config.json", foreign)
        err = one_line_error(["export", str(run), "--out", out], capsys)
    assert {"model.safetensors", "tokenizer.json", "theirs/keep.bin"} <= seen  # ours were there
    assert f"--out={out}: storage error" in err and "connection reset by peer" in err
    assert s3_files(out) == {"theirs/keep.bin": b"another writer's object"}
    storage.delete_file(foreign)  # the other writer removes its object
    assert cli_main(["export", str(run), "--out", out]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(s3_files(out))


def test_an_export_to_s3_joined_by_another_writer_refuses_to_finish_and_keeps_their_object(
        run, bucket, monkeypatch, capsys):
    """A second writer putting an object under the prefix while the export runs (after its
    existence check): the export does not write config.json over a mixed prefix; it says so in one
    line, removes its own objects and leaves the other writer's."""
    import raylm.use.hf as hf

    out = f"{bucket}/joined-export"
    write_weights = hf._write_weights

    def with_a_second_writer(*args, **kwargs):
        storage.write_bytes(f"{out}/model.safetensors.index.json", b"{}")  # not ours: we write one file
        return write_weights(*args, **kwargs)

    monkeypatch.setattr(hf, "_write_weights", with_a_second_writer)
    err = one_line_error(["export", str(run), "--out", out], capsys)
    assert f"--out={out}: 1 file(s) appeared there while this command was writing" in err, err
    assert s3_files(out) == {"model.safetensors.index.json": b"{}"}


def test_export_and_prepare_refuse_a_prefix_that_holds_objects(run, bucket, capsys):
    """An s3:// output that already holds an object is refused before anything is written; one
    that holds only pyarrow's empty "directory" markers (what a cleaned-up failure leaves) is not."""
    out = f"{bucket}/taken"
    storage.write_bytes(f"{out}/old.txt", b"old")
    assert "already holds objects" in one_line_error(["export", str(run), "--out", out], capsys)
    cfg = load_config(DEBUG, [f"data.prepared_path={out}"])
    with pytest.raises(DataError, match="already exists and was not prepared by this config"):
        with prepared.writing(cfg):
            pass
    assert s3_files(out) == {"old.txt": b"old"}
    storage.delete_file(f"{out}/old.txt")  # pyarrow leaves the marker taken/
    assert storage.exists(out)
    with prepared.writing(cfg) as target:
        assert target is not None


@pytest.mark.slow
def test_a_failed_prepare_to_s3_deletes_only_its_own_objects(ray_cluster, run, bucket, monkeypatch, capsys):
    """`raylm prepare` to s3:// failing as it writes manifest.json, after another writer put an
    object under the prefix, deletes its tokenizer and shards and nothing else."""
    out = f"{bucket}/failed-prepare"
    tokenizer = next(run.glob("checkpoint_*/tokenizer.model"))  # no tokenizer training: a smaller corpus
    seen = second_writer_then_fail(monkeypatch, "manifest.json", f"{out}/theirs.parquet")
    assert cli_main(["prepare", DEBUG, f"data.prepared_path={out}", f"tokenizer.path={tokenizer}",
                     "data.sources.0.max_bytes=60000"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"raylm: error: data.prepared_path={out}: storage error") and "connection reset" in err
    assert {"tokenizer.model", "train/part-00000.bin", "theirs.parquet"} <= seen  # ours were there
    assert s3_files(out) == {"theirs.parquet": b"another writer's object"}


# ---------------------------------------------------------------------------------------
# Item 8: output paths are one line each


def test_run_output_dir_that_is_a_file_or_unwritable_is_one_line_naming_the_key(tmp_path, monkeypatch, capsys):
    """run.output_dir naming a file, a path under a file, or a place no directory can be made
    (/proc) stops `raylm train` before it starts, in one line naming run.output_dir; the file is kept."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("mine")
    train = ["train", DEBUG, "--local", "train.max_steps=2", "train.checkpoint_every=2", "run.sample_tokens=0"]
    for bad, said in [("afile", "is a file, not a directory"),
                      ("afile/sub", f"{tmp_path / 'afile'} is a file, not a directory"),
                      ("/proc/raylm-nowhere", "cannot create a directory in /proc")]:
        err = one_line_error([*train, f"run.output_dir={bad}"], capsys)
        assert f"run.output_dir={bad}: {said}" in err, err
    assert sorted(os.listdir(tmp_path)) == ["afile"] and (tmp_path / "afile").read_text() == "mine"


def test_unknown_schemes_are_refused_for_every_path_key_and_argument(run, tmp_path, monkeypatch, capsys):
    """`mock:///` (any scheme but s3, gs, and file where raylm only reads) is one line naming the
    key or argument, for every path-valued config key and command argument; it never becomes a
    local folder named `mock:`."""
    monkeypatch.chdir(tmp_path)
    for key in ["run.output_dir", "run.resume_from", "data.prepared_path", "tokenizer.path", "data.sources.0.path"]:
        err = one_line_error(["config", DEBUG, f"{key}=mock:///x"], capsys)
        assert f"{key}=mock:///x: unsupported storage scheme mock://" in err, err
    assert "run.output_dir=file:///x: unsupported" in one_line_error(["config", DEBUG, "run.output_dir=file:///x"],
                                                                     capsys)
    assert "model.init_from='hf:s3://b/x'" in one_line_error(["config", DEBUG, "model.init_from=hf:s3://b/x"], capsys)
    err = one_line_error(["train", DEBUG, "--local", "train.max_steps=2", "run.output_dir=mock:///"], capsys)
    assert "run.output_dir=mock:///: unsupported storage scheme mock://" in err
    for args, named in [(["generate", "mock:///r", "--prompt", "x"], "RUN_OR_CHECKPOINT=mock:///r"),
                        (["eval", "mock:///r"], "RUN_OR_CHECKPOINT=mock:///r"),
                        (["eval", str(run), "--data", "mock:///d"], "--data=mock:///d"),
                        (["plot", "mock:///r"], "RUN_DIR=mock:///r"),
                        (["plot", str(run), "--out", "mock:///p"], "--out=mock:///p"),
                        (["export", "mock:///r", "--out", str(tmp_path / "hf")], "RUN_OR_CHECKPOINT=mock:///r"),
                        (["export", str(run), "--out", "mock:///hf"], "--out=mock:///hf")]:
        assert f"{named}: unsupported storage scheme mock://" in one_line_error(args, capsys), args
    assert os.listdir(tmp_path) == []


def test_export_out_unwritable_or_under_a_file_is_one_line(run, tmp_path, capsys):
    """--out under a regular file, or where no directory can be made (/proc), is one line naming
    --out; a file named by --out is kept."""
    (tmp_path / "afile").write_text("mine")
    for bad, said in [(tmp_path / "afile" / "hf", f"{tmp_path / 'afile'} is a file, not a directory"),
                      (Path("/proc/raylm-nowhere/hf"), "cannot create a directory in /proc"),
                      (tmp_path / "afile", f"--out={tmp_path / 'afile'}: is a file, not a directory")]:
        assert said in one_line_error(["export", str(run), "--out", str(bad)], capsys)
    assert (tmp_path / "afile").read_text() == "mine"


def test_export_out_naming_a_link_follows_it_to_an_empty_directory_and_refuses_otherwise(run, tmp_path, capsys):
    """--out LINK -> an empty directory: the export lands in that directory and the link stays a
    link. A link to a non-empty directory or to nothing is one line; nothing is replaced."""
    empty, full = tmp_path / "empty", tmp_path / "full"
    empty.mkdir()
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    link = tmp_path / "link"
    link.symlink_to(empty)
    assert cli_main(["export", str(run), "--out", str(link)]) == 0
    assert link.is_symlink() and (empty / "config.json").is_file() and (link / "model.safetensors").is_file()

    to_full, dangling = tmp_path / "to-full", tmp_path / "dangling"
    to_full.symlink_to(full)
    dangling.symlink_to(tmp_path / "nowhere")
    assert "exists and is not an empty directory" in one_line_error(["export", str(run), "--out", str(to_full)],
                                                                   capsys)
    err = one_line_error(["export", str(run), "--out", str(dangling)], capsys)
    assert f"--out {dangling}: is a link to {tmp_path / 'nowhere'}, which does not exist" in err
    assert files_under(full) == {"keep.txt": b"mine"} and dangling.is_symlink() and not (tmp_path / "nowhere").exists()
