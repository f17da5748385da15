"""A broken model card is refused at reload, with its reason in /readyz, and no request fails meanwhile.

Real servers (``python -m service``) on 127.0.0.1 with copies of the real tiny model whose card is broken one
way at a time, as a careless edit, a corrupt copy or a bad training run would break it (issue 31, M1).
"""

from __future__ import annotations

import json
import math
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
