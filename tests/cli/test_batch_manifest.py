"""`sd35 batch` manifest: JSONL records that survive a hard stop, and what a rerun may skip."""

import json
import os

from sd35_cli.batch.manifest import MANIFEST_NAME, Manifest, is_done


def done(job, fp, files):
    return {"type": "job", "job": job, "status": "done", "fingerprint": fp, "files": files}


def test_records_are_appended_and_the_last_one_of_a_job_counts(tmp_path):
    m = Manifest.in_dir(str(tmp_path))
    m.append({"type": "run", "jobs": 2})
    m.append({"type": "job", "job": "0:0", "status": "error", "error": "boom", "fingerprint": "a"})
    m.append(done("0:0", "a", ["00000_1_9_0.png"]))
    m.append({"type": "requeued", "job": "1:0", "server": "h:1"})
    m.close()
    lines = [json.loads(x) for x in open(tmp_path / MANIFEST_NAME)]
    assert [x["type"] for x in lines] == ["run", "job", "job", "requeued"]
    assert all("time" in x for x in lines)
    assert m.latest()["0:0"]["status"] == "done" and "1:0" not in m.latest()


def test_a_torn_last_line_is_ignored_and_the_next_record_starts_on_its_own_line(tmp_path):
    path = tmp_path / MANIFEST_NAME
    path.write_text(json.dumps(done("0:0", "a", ["x.png"])) + "\n" + '{"type": "job", "job": "1:0", "sta')
    m = Manifest(str(path))
    assert list(m.latest()) == ["0:0"]
    m.append(done("1:0", "b", ["y.png"]))
    m.close()
    assert list(m.latest()) == ["0:0", "1:0"]


def test_done_means_same_prompt_and_files_still_there(tmp_path):
    (tmp_path / "a.png").write_bytes(b"png")
    rec = done("0:0", "fp", ["a.png"])
    assert is_done(rec, "fp", str(tmp_path))
    assert not is_done(rec, "other", str(tmp_path))  # the row, seed or workflow changed
    assert not is_done({**rec, "status": "error"}, "fp", str(tmp_path))
    assert not is_done(None, "fp", str(tmp_path))
    os.remove(tmp_path / "a.png")
    assert not is_done(rec, "fp", str(tmp_path))


def test_fresh_keeps_the_old_manifest_aside(tmp_path):
    Manifest.in_dir(str(tmp_path)).append(done("0:0", "a", ["x.png"]))
    m = Manifest.in_dir(str(tmp_path), fresh=True)
    assert m.latest() == {}
    assert Manifest(str(tmp_path / (MANIFEST_NAME + ".old"))).latest()["0:0"]["fingerprint"] == "a"
