"""A broken model card is refused at reload, with its reason in /readyz, and no request fails meanwhile.

Real servers (``python -m service``) on 127.0.0.1 with copies of the real tiny model whose card is broken one
way at a time, as a careless edit, a corrupt copy or a bad training run would break it (issue 31, M1).
"""

from __future__ import annotations

import json
import math
import shutil
import threading
from collections.abc import Callable

import httpx
import numpy as np
import pytest

from modelcard.card import CardError, read_card, seal_card, write_card
from modelcard.runtime import ModelRuntime
from modelcard.store import POINTER, add_version, current_version, set_current
from modelcard.validate import card_problems
from service.registry import ReloadError, warm_up
from tests.conftest import clone_version, wait_for
from tests.test_service import ADMIN, make_body


def broken_clone(store, version: str, name: str, breaks: Callable[[dict], object], reseal: bool = True) -> str:
    """A copy of ``version`` whose card ``breaks`` changes; resealed (its checksum matches: only the numbers
    are wrong) unless ``reseal`` is false (then only the checksum tells)."""
    clone_version(store, version, name)
    card = read_card(store / name, verify=False)
    breaks(card)
    if reseal:
        write_card(store / name, card)
    else:
        (store / name / "card.json").write_text(json.dumps(card, indent=1))
    return name


def measurement(k: int, key: str, value: object) -> Callable[[dict], object]:
    return lambda card: card["variables"]["measurements"][k].__setitem__(key, value)


BREAKS = {
    "zero std": (measurement(3, "std", 0.0), "std is 0.0"),
    "NaN std": (measurement(3, "std", math.nan), "std is nan"),
    "negative std": (measurement(0, "std", -1.0), "std is -1.0"),
    "NaN mean": (measurement(5, "mean", math.nan), "mean is nan"),
    "NaN calibration": (
        lambda card: card["calibration"]["spread_scale"].__setitem__(0, math.nan),
        "calibration.spread_scale[0] is nan",
    ),
    "missing bound": (
        lambda card: card["variables"]["controls"][1]["bounds"].pop("max"),
        "bounds must give a finite min and max",
    ),
    "bounds crossed": (
        lambda card: card["variables"]["measurements"][2].__setitem__("bounds", {"min": 5.0, "max": 1.0}),
        "is not below max",
    ),
    "NaN stability": (lambda card: card["stability"].__setitem__("spectral_radius", math.nan), "spectral_radius"),
    "zero samples": (lambda card: card["calibration"].__setitem__("samples", 0), "samples is 0"),
}


@pytest.mark.parametrize("kind", list(BREAKS))
def test_a_broken_card_is_refused_at_reload_with_its_reason_and_no_request_fails(serve, store_copy, rt, kind) -> None:
    store, version = store_copy
    breaks, words = BREAKS[kind]
    s = serve(store, KOVAE_ADMIN_API_KEYS='["admin-secret"]')
    body = make_body(rt)
    statuses: list[int] = []
    stop = threading.Event()

    def stream() -> None:  # requests all along the refused reload, on their own connection
        with httpx.Client(base_url=s.url, timeout=30) as client:
            while not stop.is_set():
                statuses.append(client.post("/forecast", json=body).status_code)

    thread = threading.Thread(target=stream)
    thread.start()
    try:
        assert wait_for(lambda: len(statuses) >= 5)
        (store / POINTER).write_text(broken_clone(store, version, "v-broken", breaks) + "\n")
        r = s.client.post("/admin/reload", headers=ADMIN)
        after = len(statuses)
        assert wait_for(lambda: len(statuses) >= after + 5)
    finally:
        stop.set()
        thread.join()
    assert r.status_code == 409 and words in r.json()["detail"], r.text
    ready = s.client.get("/readyz").json()
    assert ready["model_version"] == version and ready["status"] == "ready"
    assert ready["refused"]["version"] == "v-broken" and words in ready["refused"]["reason"]
    assert set(statuses) == {200}, statuses


def test_a_card_changed_after_it_was_written_is_refused_by_its_checksum(serve, store_copy) -> None:
    """The audit's broken card: a copy of the served version with one std set to 0 by hand, not resealed."""
    store, version = store_copy
    s = serve(store, KOVAE_ADMIN_API_KEYS='["admin-secret"]')
    (store / POINTER).write_text(broken_clone(store, version, "v-edited", measurement(3, "std", 0.0), False) + "\n")
    r = s.client.post("/admin/reload", headers=ADMIN)
    assert r.status_code == 409 and "does not match card.sha256" in r.json()["detail"]
    assert s.client.get("/readyz").json()["refused"]["version"] == "v-edited"


def test_an_unsealed_card_is_not_served_or_promoted_until_sealed(store_copy) -> None:
    store, version = store_copy
    name = clone_version(store, version, "v-old")
    (store / name / "card.sha256").unlink()  # a version written before cards had checksums
    read_card(store / name, verify=True)  # still readable (upgrades, listings)
    with pytest.raises(CardError, match=r"card\.sha256: missing"):
        ModelRuntime(store / name)
    with pytest.raises(CardError, match=r"card\.sha256: missing"):
        set_current(store, name)
    seal_card(store / name)
    set_current(store, name)
    assert ModelRuntime(store / name).version == name


def test_a_store_takes_one_plants_models_and_a_rollback_always_goes(store_copy, tmp_path) -> None:
    """Another catalog's version is not added to a store (a wrong --store put the example plant's model where
    BSM1's callers are served); if one was served all the same (before the check), or the served card is
    broken, switching back to a stored version still goes."""
    store, version = store_copy
    other = tmp_path / "v-other"
    clone_version(store, version, "v-other")
    (store / "v-other").rename(other)
    card = read_card(other, verify=False)
    card["catalog"]["name"] = "example-plant"
    write_card(other, card)
    with pytest.raises(CardError, match=r"serves v1, a model of catalog 'bsm1'.*one of catalog 'example-plant'"):
        add_version(store, other)
    assert not (store / "v-other").exists()
    other.rename(store / "v-other")  # as a --force before the check put it there
    (store / POINTER).write_text("v-other\n")
    set_current(store, version)
    assert current_version(store) == version
    clone_version(store, version, "v-back")
    (store / version / "card.json").write_text("{")  # the served card broken
    set_current(store, "v-back")
    assert current_version(store) == "v-back"


def test_a_card_edited_by_hand_is_never_sealed_again_by_a_re_export(store_copy, capsys) -> None:
    """python -m export rewrote the card's checksum over a hand-edited score, and promote then served it."""
    from export.__main__ import main as export_main
    from training.promote import main as promote_main

    store, version = store_copy
    name = clone_version(store, version, "v-edited")
    card_path = store / name / "card.json"
    card = json.loads(card_path.read_text())
    card["metrics"]["score"] = 0.9
    card_path.write_text(json.dumps(card, indent=1))
    assert export_main(["--version", name, "--store", str(store)]) == 2
    assert "changed after it was written" in capsys.readouterr().err
    assert promote_main(["--store", str(store), name]) == 2
    assert promote_main(["--store", str(store)]) == 0
    assert f"{name}  unreadable or changed by hand" in capsys.readouterr().out
    assert export_main(["--version", "../x", "--store", str(store)]) == 2  # never a folder outside the store
    assert "is not a version name" in capsys.readouterr().err
    # A mistyped --store is named, not listed as a store without versions.
    assert promote_main(["--store", str(store / "nostore")]) == 2
    assert "no model store at" in capsys.readouterr().err
    (store / "empty").mkdir()
    assert promote_main(["--store", str(store / "empty")]) == 0
    assert "no versions in" in capsys.readouterr().out
    (store / "a-file").write_text("")
    assert promote_main(["--store", str(store / "a-file")]) == 2  # a traceback from mkdir with --add before
    assert promote_main(["--store", str(store / "a-file"), "--add", str(store / version)]) == 2
    assert capsys.readouterr().err.count("is a file, not a model store folder") == 2
    for flags, words in (  # ignored silently before: now argparse's usage error, named
        (["--promote"], "--promote serves the version --add adds"),
        ([version, "--add", str(store / version)], f"give {version} or --add, not both"),
    ):
        with pytest.raises(SystemExit) as exc:
            promote_main(["--store", str(store), *flags])
        assert exc.value.code == 2 and words in capsys.readouterr().err


def test_readyz_clears_a_refusal_once_current_names_the_served_version(serve, store_copy) -> None:
    """/readyz still reported the refused version 30 s after CURRENT was put back."""
    store, version = store_copy
    s = serve(store, KOVAE_POLL_INTERVAL_S="0.1")
    (store / POINTER).write_text(broken_clone(store, version, "v-broken", measurement(3, "std", 0.0)) + "\n")
    assert wait_for(lambda: (s.client.get("/readyz").json()["refused"] or {}).get("version") == "v-broken")
    (store / POINTER).write_text(version + "\n")
    assert wait_for(lambda: s.client.get("/readyz").json()["refused"] is None, seconds=5)
    assert s.client.get("/readyz").json()["model_version"] == version


def test_the_warm_up_forecasts_a_realistic_history_not_the_means(rt) -> None:
    """A zero std slipped through a warm-up at the scalers' means (0/0 reads as a sensor gap there, and the
    card's own noise is zero too); forecasting a history that moves, it cannot."""
    warm_up(rt)
    broken = ModelRuntime(rt.version_dir)
    broken.x_std, broken.out_std = broken.x_std.copy(), broken.out_std.copy()
    broken.x_std[3] = broken.out_std[3] = 0.0  # as if the card had slipped past its checks (out_std scales outputs)
    with pytest.raises(ReloadError, match="not finite"):
        warm_up(broken)


def test_the_committed_cards_are_sealed_and_servable() -> None:
    from tests.conftest import ROOT

    for folder in sorted(p for p in (ROOT / "models").iterdir() if p.is_dir()):
        card = read_card(folder, verify=True, sealed=True)
        assert card_problems(card) == [], folder.name
        assert np.all(ModelRuntime(folder).x_std > 0)


def test_the_pulls_of_a_card_are_weights_of_the_right_shape_or_null(rt) -> None:
    """calibration.gap_pull and calibration.loop_pull are null where calibration kept no such term: servable.
    A pull outside [0, 1], a loop pull of the wrong width or on a model whose loops do not drive it is refused,
    by path; a spread that is null is named, not a crash."""
    card = json.loads(json.dumps(rt.card))
    card["calibration"].update(gap_pull=None, loop_pull=None)
    assert card_problems(card) == []
    loops = len(card["variables"]["loops"])
    card["model"]["loop_feedback"] = True
    card["calibration"]["loop_pull"] = [[0.5] * loops, [0.25] * loops]
    assert card_problems(card) == []
    card["calibration"]["loop_pull"][1][0] = math.nan
    assert card_problems(card) == ["calibration.loop_pull[1][0] is nan, not a finite number"]
    card["calibration"]["loop_pull"] = [[1.5] * loops]
    assert card_problems(card) == ["calibration.loop_pull[0][0] is 1.5: a pull must lie in [0, 1]"] * 1 + [
        f"calibration.loop_pull[0][{k}] is 1.5: a pull must lie in [0, 1]" for k in range(1, loops)
    ]
    card["calibration"]["loop_pull"] = [[0.5] * (loops + 1)]
    assert card_problems(card) == [f"calibration.loop_pull must be a table of lead times by {loops} loop(s)"]
    card["model"]["loop_feedback"] = False
    assert "model.loop_feedback is off" in card_problems(card)[0]
    card["calibration"]["loop_pull"], card["calibration"]["spread_scale"] = None, None
    assert card_problems(card) == ["calibration.spread_scale is None, not a finite number"]


def test_what_the_service_would_refuse_is_neither_promoted_nor_added(store_copy, tmp_path) -> None:
    """A damaged plans graph was promoted and added (only model.onnx was checked), and a copied folder or a link
    whose card names another version was promoted: every pod then refused it. Now each is refused by name."""
    store, version = store_copy
    name = clone_version(store, version, "v-plans")
    plans = store / name / read_card(store / name, verify=False)["onnx"]["plans_file"]
    good = plans.read_bytes()
    plans.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(CardError, match=r"v-plans/plans\.onnx: SHA-256 .* does not match"):
        set_current(store, name)
    with pytest.raises(CardError, match=r"plans\.onnx: SHA-256"):
        add_version(tmp_path / "fresh", store / name)
    assert current_version(store) == version and not (tmp_path / "fresh" / name).exists()
    shutil.copytree(store / version, store / "backup-copy")  # cp -r V backup-copy
    (store / "link-copy").symlink_to(version)
    for copy in ("backup-copy", "link-copy"):
        with pytest.raises(CardError, match=f"{copy}/card.json names version '{version}', not its folder's"):
            set_current(store, copy)
    assert current_version(store) == version


@pytest.mark.parametrize("stop_at", [1, 2, 3])
def test_a_card_rewritten_in_place_is_vouched_for_wherever_the_write_stops(store_copy, monkeypatch, stop_at) -> None:
    """An upgrade or re-export rewrites a stored card in place. Stopped (disk full, killed) after the new card but
    before its checksum, the version was refused for good, and every tool that could repair it refused it too.
    Stopped at any of the writes, the version now reads as the old card or the new one, and is served."""
    import modelcard.card as card_module

    store, version = store_copy
    name = clone_version(store, version, "v-upgraded")
    new = read_card(store / name, verify=False)
    new["description_note"] = "upgraded in place"
    real, calls = card_module.atomic_write, []

    def stops(path, data: bytes) -> None:
        calls.append(path.name)
        if len(calls) == stop_at:
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(card_module, "atomic_write", stops)
    with pytest.raises(OSError, match="No space"):
        write_card(store / name, new)
    monkeypatch.undo()
    card = read_card(store / name, verify=True, sealed=True)
    assert card.get("description_note") in (None, "upgraded in place")
    assert ModelRuntime(store / name).version == name
    write_card(store / name, new)  # once there is room: the new card, sealed alone
    assert read_card(store / name, sealed=True)["description_note"] == "upgraded in place"
    assert (store / name / "card.sha256").read_text().count("\n") == 1


def test_the_gate_never_undoes_a_rollback_made_while_it_scored(store_copy, tmp_path, tiny_cfg, capsys) -> None:
    """The gate reads CURRENT, scores the served version for minutes, then rewrote CURRENT: an operator's
    rollback meanwhile was silently undone. Now the candidate is stored, not promoted, and the rollback stands."""
    from training import publish
    from training.prepare import prepare

    store, version = store_copy
    back = clone_version(store, version, "v-rollback-target")
    candidate = tmp_path / "runs" / "v-candidate"
    candidate.parent.mkdir()
    clone_version(store, version, "v-candidate")
    (store / "v-candidate").rename(candidate)
    real = publish.score_served

    def scored_while_rolled_back(*args, **kwargs):
        served = real(*args, **kwargs)
        set_current(store, back)  # python -m training.promote v-rollback-target, while the gate scored
        return served

    p = prepare(tiny_cfg)
    try:
        publish.score_served = scored_while_rolled_back
        rc = publish.promote_if_better(store, candidate, 1.0, p, tiny_cfg, force=False, never=False)
    finally:
        publish.score_served = real
    assert rc == 1 and current_version(store) == back
    assert "not promoted" in capsys.readouterr().err and (store / "v-candidate").is_dir()


def test_an_add_under_way_is_not_taken_for_a_crashed_writers_leftovers(store_copy, tmp_path, monkeypatch) -> None:
    """The staging folder took its old source's time, so a `training.promote` listing run meanwhile (which clears
    what crashed writers left, an hour old) deleted it under the writer, whose add then failed."""
    import os
    import time

    import modelcard.store as store_module
    from modelcard.store import remove_stale

    store, version = store_copy
    source = tmp_path / "old" / "v-old-source"
    source.parent.mkdir()
    clone_version(store, version, "v-old-source")
    (store / "v-old-source").rename(source)
    hours_ago = time.time() - 7200
    os.utime(source, (hours_ago, hours_ago))
    real, removed = store_module.fsync_dir, []

    def listing_meanwhile(path) -> None:
        removed.extend(remove_stale(store))  # python -m training.promote, run while the add fsyncs
        real(path)

    monkeypatch.setattr(store_module, "fsync_dir", listing_meanwhile)
    assert add_version(store, source) == "v-old-source"
    assert removed == [] and read_card(store / "v-old-source", sealed=True)["version"] == "v-old-source"


def test_the_served_version_changed_in_place_is_loaded_again(serve, store_copy) -> None:
    """`training.upgrade_card --optimizer` (or a re-export) on the served version: /admin/reload said
    `changed: false` and the pods kept the old card until a restart, while a restarted pod served the new one
    under the same version name."""
    store, version = store_copy
    s = serve(store, KOVAE_ADMIN_API_KEYS='["admin-secret"]')
    card = read_card(store / version)
    card["metrics"]["score"] = 0.4321
    write_card(store / version, card)
    r = s.client.post("/admin/reload", headers=ADMIN)
    assert r.status_code == 200 and r.json()["changed"] is True, r.text
    assert s.client.get("/model").json()["metrics"]["score"] == 0.4321
    r = s.client.post("/admin/reload", headers=ADMIN)  # nothing changed since
    assert r.status_code == 200 and r.json()["changed"] is False, r.text


def test_the_poller_loads_an_in_place_change_once_it_stands_still(store_copy) -> None:
    """A re-export writes the graph, then the card: a poll between the two refused the served version (and the
    refusal raised the alert). The poller now waits until the files stood still for one poll."""
    from service.registry import ModelRegistry

    store, version = store_copy
    registry = ModelRegistry(store)
    registry.reload()
    card = read_card(store / version)
    graph = store / version / card["onnx"]["file"]
    old_graph = graph.read_bytes()
    graph.write_bytes(old_graph + b"\0")  # the re-export's first file, its card not written yet: they disagree
    registry.poll_once()
    assert registry.refused is None and registry.runtime.card["metrics"]["score"] == card["metrics"]["score"]
    graph.write_bytes(old_graph)  # the re-export done: graph and card agree again
    card["metrics"]["score"] = 0.4321
    write_card(store / version, card)
    registry.poll_once()  # changed since the last poll: perhaps still being written
    assert registry.refused is None and registry.runtime.card["metrics"]["score"] != 0.4321
    registry.poll_once()  # stood still: loaded
    assert registry.refused is None and registry.runtime.card["metrics"]["score"] == 0.4321
    registry.stop()
