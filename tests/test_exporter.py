"""`federimed exporter`: a hospital's Prometheus series, read from its egress ledger."""

from __future__ import annotations

import json

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from federimed.cli import main
from federimed.hospital import ledger
from federimed.hospital.policy import SiteRefusal, refusal_code
from federimed.hospital.site_exporter import registry_for

SITE = "hospital-2"


def _entry(kind="train", error=None, loss=1.0, examples=120, steps=15, nbytes=4096):
    return {
        "site": SITE, "run_id": 7, "app_hash": "a" * 64, "round": 1, "kind": kind,
        "error": error, "arrays_sha256": None if error else "b" * 64,
        "metrics": {} if error else {"train_loss": loss, "num_examples": examples},
        "bytes": 0 if error else nbytes, "steps": None if error else steps,
    }  # fmt: skip


def scrape(path) -> dict:
    text = generate_latest(registry_for(path)).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_the_ledger_becomes_the_hospitals_series(tmp_path):
    path = tmp_path / "egress-ledger.jsonl"
    ledger.append(path, _entry(loss=2.0))
    ledger.append(path, _entry(loss=0.5, examples=130))
    ledger.append(path, _entry(kind="evaluate", steps=None, nbytes=0))
    refusal = SiteRefusal(SITE, "APP_NOT_APPROVED", f"app bundle abc is not approved by {SITE}")
    ledger.append(path, _entry(error=str(refusal)))
    ledger.append(path, _entry(error="an error the runner did not write"))
    got = scrape(path)
    site = (("site", SITE),)
    assert got[("federimed_site_ledger_valid", site)] == 1
    assert got[("federimed_site_replies_total", (("kind", "train"), *site))] == 2
    assert got[("federimed_site_replies_total", (("kind", "evaluate"), *site))] == 1
    assert got[("federimed_site_bytes_sent_total", site)] == 2 * 4096
    assert got[("federimed_site_steps_total", site)] == 30
    assert got[("federimed_site_examples_used_total", site)] == 250
    assert got[("federimed_site_training_loss", site)] == 0.5
    code = (("code", "APP_NOT_APPROVED"), *site)
    assert got[("federimed_site_refused_total", code)] == 1
    assert got[("federimed_site_refused_total", (("code", "OTHER"), *site))] == 1


def test_a_broken_chain_shows_and_counts_only_what_verified(tmp_path):
    path = tmp_path / "egress-ledger.jsonl"
    for loss in (2.0, 1.0, 0.5):
        ledger.append(path, _entry(loss=loss))
    lines = path.read_text().splitlines()
    edited = json.loads(lines[1])
    edited["bytes"] = 1  # a line changed after the fact
    path.write_text("\n".join([lines[0], json.dumps(edited), lines[2]]) + "\n")
    got = scrape(path)
    assert got[("federimed_site_ledger_valid", (("site", SITE),))] == 0
    assert got[("federimed_site_replies_total", (("kind", "train"), ("site", SITE)))] == 1


def test_no_ledger_yet_is_a_valid_empty_one(tmp_path):
    got = scrape(tmp_path / "missing.jsonl")
    assert got[("federimed_site_ledger_valid", (("site", ""),))] == 1


def test_refusal_codes_and_a_missing_ledger_setting(capsys, monkeypatch):
    """The codes as the guard writes them (a site's refusal), and a reason that names a
    code without the site."""
    floor = SiteRefusal(SITE, "POLICY_FLOOR", "batch-size=2 is below the floor [sic]")
    assert refusal_code(str(floor)) == "POLICY_FLOOR"
    assert refusal_code("the task failed at the hospital [code TASK_FAILED]") == "TASK_FAILED"
    assert refusal_code("no code here") == "OTHER"
    assert refusal_code("a reason quoting [code X] in its middle") == "OTHER"
    monkeypatch.delenv("FEDERIMED_EXPORTER_LEDGER", raising=False)
    assert main(["exporter"]) == 2
    assert "FEDERIMED_EXPORTER_LEDGER: Field required" in capsys.readouterr().err
