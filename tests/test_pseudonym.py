"""Pseudonymisation and decoy rows: identifiers never reach the recoverable prompt (the real attack is
run on the captured frames of a seeded model), stand-ins are consistent and restored, and the real
row's answer under decoys equals the undefended answer."""

import random
import re

import pytest

from lambdasplit.device.runtime import SplitRuntime
from lambdasplit.device.sampling import SamplingParams
from lambdasplit.engine.local import load_local_body
from lambdasplit.privacy.attacks import Attacker
from lambdasplit.privacy.capture import observe
from lambdasplit.privacy.decoys import DecoyMaker, Message
from lambdasplit.privacy.pii_audit import decoy_cost, detector_recall, load_pii_prompts
from lambdasplit.privacy.protect import ProtectedChat, Protection
from lambdasplit.privacy.pseudonym import Detector, Pseudonymizer, StandIns
from lambdasplit.split.load import open_source

PROMPT = ("Hi, I'm Margaret Okafor and my email is m.okafor@brightmail.net, phone +44 7700 900123, card 4539 1488 0343 6467. "
          "Please write to my landlord about the heater at 14 Elm Grove Road.")
REAL = ["Margaret Okafor", "m.okafor@brightmail.net", "+44 7700 900123", "4539 1488 0343 6467", "14 Elm Grove Road"]


@pytest.fixture(scope="module")
def detector() -> Detector:
    return Detector()


def test_detector_finds_every_kind_of_the_tuning_set(detector):
    recall = detector_recall(load_pii_prompts("tune"), detector)
    assert recall["overall"] == 1.0, recall["misses"]
    assert len(load_pii_prompts("heldout")) >= 100


def test_stand_ins_are_consistent_derived_and_restored(detector):
    p = Pseudonymizer(detector, StandIns(3))
    first = p.pseudonymize(PROMPT)
    assert not any(r in first.text for r in REAL)
    assert [s.kind for s in first.originals] == ["PERSON", "EMAIL", "PHONE", "CREDIT_CARD", "ADDRESS"]
    name = first.spans[0].text
    first_name, last_name = name.split()
    email = first.spans[1].text
    assert email.startswith(f"{first_name[0].lower()}.") and last_name.lower() in email  # derived from the stand-in name
    assert first.spans[2].text.startswith("+44 ")
    again = p.pseudonymize("Margaret Okafor again, and Margaret alone.")
    assert again.text.startswith(name) and f"{first_name} alone" in again.text
    assert p.restore(first.text) == PROMPT
    assert p.restore(f"Dear {first_name}, ...") == "Dear Margaret, ..."
    recased = last_name[0] + last_name[1:].swapcase()  # the model re-cases a stand-in it copies ("McFarland")
    assert p.restore(f"Mrs {recased} and {last_name.lower()}") == f"Mrs Okafor and {last_name.lower()}"  # a lower-case word stays
    restorer = p.restorer()
    text = f"Dear {first_name} {recased}, thanks."
    assert "".join(restorer.feed(text[i:i + 2]) for i in range(0, len(text), 2)) + restorer.flush() == "Dear Margaret Okafor, thanks."


def test_card_iban_and_date_stand_ins_stay_valid():
    s = StandIns(0)
    card = re.sub(r"\D", "", s.get("CREDIT_CARD", "4539 1488 0343 6467"))
    total = sum(int(d) if i % 2 == 0 else sum(divmod(int(d) * 2, 10)) for i, d in enumerate(reversed(card)))
    assert total % 10 == 0 and card[0] == "4"
    iban = s.get("IBAN", "GB29 NWBK 6016 1331 9268 19").replace(" ", "")
    assert iban[:2] == "GB" and int("".join(str(int(c, 36)) for c in iban[4:] + iban[:4])) % 97 == 1
    day, month, year = map(int, s.get("DATE", "30/04/1970").split("/"))
    assert 1 <= day <= 28 and 1 <= month <= 12 and 1964 <= year <= 1976


def test_streamed_restoration_equals_whole_restoration(detector):
    p = Pseudonymizer(detector, StandIns(5))
    sent = p.pseudonymize(PROMPT).text
    restorer = p.restorer()
    pieces = [sent[i:i + 3] for i in range(0, len(sent), 3)]
    assert "".join(restorer.feed(x) for x in pieces) + restorer.flush() == PROMPT
    first, last = p.pseudonymize("Margaret Okafor").text.split()
    tricky = [f"{sent} {first} {last}board", f"{last.upper()} x", f"{first.lower()}!", f"x{first} {last}", f"{last}s and {last}."]
    chunks = random.Random(0)
    for text in tricky:  # a stand-in split anywhere, or followed by more of a word, restores as the whole text does
        for _ in range(20):
            restorer, out, at = p.restorer(), "", 0
            while at < len(text):
                size = chunks.randint(1, 4)
                out, at = out + restorer.feed(text[at:at + size]), at + size
            assert out + restorer.flush() == p.restore(text), text


def test_pseudonymised_identifiers_never_appear_in_the_recovered_prompt(llama, detector):
    """The curious cloud's vocabulary matching recovers the prompt it was sent exactly, and that prompt
    holds the stand-ins, not one real identifier."""
    runtime = SplitRuntime.load(llama, (1, 2))
    attacker = Attacker(open_source(llama, None, allow_shallow=True), budget=49152)
    matcher = attacker.matcher(1)
    matcher.tol, matcher.patience = 1e-6, 10**9  # a random tiny model ranks some true tokens low: search until an exact match
    body = load_local_body(llama, (1, 2))
    body.captured = []
    chat = ProtectedChat(runtime, Protection(pseudonymize=True, seed=0), detector)
    result = chat.generate(body, [{"role": "user", "content": PROMPT}], SamplingParams(max_new_tokens=4))
    prompt_ids = result.result.prompt_token_ids[0]
    recovered = attacker.match(1, observe(body.captured).uplink[0][0]).token_ids
    assert recovered == prompt_ids
    text = runtime.tokenizer.decode(recovered)
    assert not any(r in text for r in REAL)
    assert all(stand_in in text for _, _, stand_in in result.replacements)


def test_real_row_under_decoys_equals_the_undefended_output(llama, detector):
    runtime = SplitRuntime.load(llama, (2, 2))
    messages = [{"role": "user", "content": PROMPT}]
    options = SamplingParams(max_new_tokens=12)
    base = runtime.generate_ids(load_local_body(llama, (2, 2)), runtime.encode_chat(messages), None, options)
    streamed = []
    chat = ProtectedChat(runtime, Protection(decoys=3, seed=1), detector)
    result = chat.generate(load_local_body(llama, (2, 2)), messages, options, on_text=streamed.append)
    assert len(result.rows) == 4 and len({len(r) for r in result.result.prompt_token_ids}) == 1  # same token length, no padding
    assert result.token_ids == base.token_ids[0] and result.text == base.text
    assert "".join(streamed) == result.text
    assert len(result.result.timings.steps) == options.max_new_tokens  # every row ran to the end: EOS did not stop the batch
    decoys = [r for i, r in enumerate(result.rows) if i != result.real_row]
    assert all("Margaret Okafor" not in r and "4539 1488 0343 6467" not in r for r in decoys)


def test_decoy_rows_keep_their_stand_ins_across_turns(detector):
    maker = DecoyMaker(lambda messages: sum(len(m["content"].split()) for m in messages), n=3, seed=4)
    turn = [Message("user", "Write to Margaret Okafor.", detector.find("Write to Margaret Okafor."))]
    first = maker.make(turn)
    second = maker.make(turn + [Message("assistant", "Done."), Message("user", "Margaret Okafor again.",
                                                                       detector.find("Margaret Okafor again."))])
    assert first.real_row == second.real_row and first.length_matched
    for a, b in zip(first.rows, second.rows, strict=True):
        name = a[0]["content"][len("Write to "):-1]
        assert b[2]["content"] == f"{name} again."


def test_in_a_second_turn_every_decoy_row_carries_its_own_first_answer(llama, detector):
    """The cloud saw every row's first answer; in the second turn each row's history must be that
    row's own, or the one row whose history matches what it generated is the real one."""
    runtime = SplitRuntime.load(llama, (2, 2))
    options = SamplingParams(max_new_tokens=8)
    for protection in (Protection(decoys=3, seed=2), Protection(pseudonymize=True, decoys=3, seed=2)):
        chat = ProtectedChat(runtime, protection, detector)
        messages = [{"role": "user", "content": PROMPT}]
        first = chat.generate(load_local_body(llama, (2, 2)), messages, options)
        assert len(set(first.result.texts)) > 1  # the rows answered differently: the check below can fail
        follow = [*messages, {"role": "assistant", "content": first.text}, {"role": "user", "content": "Shorter, please."}]
        batch = chat.prepare(follow)
        assert batch.real_row == first.real_row
        assert [row[1]["content"] for row in batch.rows] == first.result.texts
        second = chat.generate(load_local_body(llama, (2, 2)), follow, options)
        if not protection.pseudonymize:  # the real row's answer is the undefended one in every turn
            base = runtime.generate_ids(load_local_body(llama, (2, 2)), runtime.encode_chat(follow), None, options)
            assert second.token_ids == base.token_ids[0]


def test_a_stop_string_is_matched_on_the_restored_answer(llama, detector):
    """`generate --stop` under pseudonymisation: the stop names what the user reads (a real name the
    model never writes); the answer is cut there and, without decoys, generation ends there."""
    runtime = SplitRuntime.load(llama, (2, 2))
    messages = [{"role": "user", "content": PROMPT}]
    chat = ProtectedChat(runtime, Protection(pseudonymize=True, seed=3), detector)
    full = chat.generate(load_local_body(llama, (2, 2)), messages, SamplingParams(max_new_tokens=12))
    assert len(full.text) > 4
    stop = full.text[2:4]  # two characters of the restored answer
    streamed = []
    cut = ProtectedChat(runtime, Protection(pseudonymize=True, seed=3), detector).generate(
        load_local_body(llama, (2, 2)), messages, SamplingParams(max_new_tokens=12, stop=(stop,)), on_text=streamed.append)
    assert cut.text == full.text[: full.text.index(stop)] == "".join(streamed)
    assert cut.result.finish_reasons[cut.real_row] == "stop" and len(cut.token_ids) < len(full.token_ids)
    assert len(cut.result.timings.steps) < 12  # it stopped generating


def test_decoy_cost_scales_bytes_with_rows(llama):
    runtime = SplitRuntime.load(llama, (2, 2))
    cost = decoy_cost(runtime, lambda: load_local_body(llama, (2, 2)), [{"role": "user", "content": "Hello Anna Schmidt."}], (0, 3),
                      SamplingParams(max_new_tokens=4))
    assert [c["rows"] for c in cost] == [1, 4]
    assert cost[1]["bytes_to_cloud_per_token"] > 3 * cost[0]["bytes_to_cloud_per_token"]


def test_the_ui_pseudonymises_and_shows_what_the_cloud_can_recover(llama):
    """`lambdasplit ui --pseudonymize --decoys 1`: the answer streams restored, the done event's
    cloud prompt holds stand-ins instead of the real identifiers, and two rows went to the body."""
    import json as _json

    from fastapi.testclient import TestClient

    from lambdasplit.ui.app import create_ui

    runtime = SplitRuntime.load(llama, (2, 2))
    ui = create_ui(runtime, lambda: load_local_body(str(llama), (2, 2)), {"model": "tiny"}, protection=Protection(True, 1, seed=3))
    prompt = "Write to John Smith at john.smith@example.com about his invoice."
    with TestClient(ui) as client:
        reply = client.post("/api/chat", json={"messages": [{"role": "user", "content": prompt}], "max_new_tokens": 6})
        events = [_json.loads(line[6:]) for line in reply.text.splitlines() if line.startswith("data: ")]
    done = events[-1]
    assert done["type"] == "done" and done["rows"] == 2
    assert "John Smith" not in done["cloud_prompt"] and "john.smith@example.com" not in done["cloud_prompt"]
    assert "invoice" in done["cloud_prompt"]
    assert "".join(e["text"] for e in events if e["type"] == "token") == done["text"]


def test_a_stand_in_cut_short_at_the_end_is_never_restored_in_part(detector):
    """The token limit can fall inside a stand-in: "Rose Carr" of "Rose Carrillo" must not become
    the real first name spliced with a piece of the stand-in surname ("Margaret Carr")."""
    p = Pseudonymizer(detector, StandIns(11))
    first, last = p.pseudonymize("Write to Margaret Okafor.").text[len("Write to "):-1].split()
    for cut in range(1, len(last)):
        text = f"Dear {first} {last[:cut]}"
        assert p.restore(text) == text, text
        restorer = p.restorer()
        assert "".join(restorer.feed(c) for c in text) + restorer.flush() == text
    cases = [(f"Dear {first} {last}", "Dear Margaret Okafor"), (f"Dear {first}", "Dear Margaret"), (f"Dear {first} ", "Dear Margaret "),
             (f"Dear {first} {last}, and {first} {last[:2]}", f"Dear Margaret Okafor, and {first} {last[:2]}")]
    for text, real in cases:
        assert p.restore(text) == real, text
        restorer = p.restorer()
        assert "".join(restorer.feed(c) for c in text) + restorer.flush() == real


QUASI = [  # (text, the real values that must not reach the cloud, what stays)
    ("Forward my post to 221B Baker Street, London NW1 6XE.", ["221B Baker Street", "London", "NW1 6XE"], "Street, "),
    ("I was born 14 March 1985 and need a new passport.", ["14 March 1985", "March"], "I was born "),
    ("Write to the White House, 1600 Pennsylvania Avenue NW, Washington, DC 20500.", ["Washington", "20500"], ", DC "),
    ("Meine Adresse: Invalidenstraße 116, 10115 Berlin.", ["Invalidenstraße 116", "10115", "Berlin"], "Meine Adresse: "),
    ("Ich wohne in Hamburg, geboren am 3. Mai 1990.", ["Hamburg", "Mai"], "Ich wohne in "),
]


@pytest.mark.parametrize("text, real, kept", QUASI)
def test_postcodes_cities_and_dates_in_words_are_replaced(detector, text, real, kept):
    """Issue 21: these quasi-identifiers reached the cloud as they were."""
    sent = Pseudonymizer(detector, StandIns(2)).pseudonymize(text).text
    assert not any(r in sent for r in real) and kept in sent, sent


def test_quasi_identifier_stand_ins_keep_format_and_country():
    from lambdasplit.privacy.quasi import city_country, postcode_format

    s = StandIns(5)
    for real in ("NW1 6XE", "SW1A 2AA", "M5H 2S6", "1015 CS"):
        value = s.get("POSTCODE", real)
        assert value != real and postcode_format(real).fullmatch(value), (real, value)
    assert re.fullmatch(r"D-\d{5}", s.get("POSTCODE", "D-80331")) and re.fullmatch(r"\d{5}-\d{4}", s.get("POSTCODE", "62704-1234"))
    for real, country in (("Berlin", "DE"), ("Washington", "US"), ("Toronto", "CA"), ("Sevilla", "ES"), ("Fürth-Süd", "DE")):
        value = s.get("CITY", real)
        assert value != real and city_country(value) == country, (real, value)
    assert s.get("CITY", "PARIS").isupper()
    day, month, year = s.get("DATE", "14th of March, 1985").replace(" of", "").replace(",", "").split()
    assert month in {"January", "February", "April", "May", "June", "July", "August", "September", "October", "November",
                     "December"} and 1979 <= int(year) <= 1991
    assert day == f"{int(day[:-2])}{ {1: 'st', 2: 'nd', 3: 'rd', 21: 'st', 22: 'nd', 23: 'rd'}.get(int(day[:-2]), 'th') }"
    assert s.get("DATE", "7 de julio de 1992").split()[2] in {"enero", "febrero", "marzo", "abril", "mayo", "junio", "agosto",
                                                              "septiembre", "octubre", "noviembre", "diciembre"}


@pytest.mark.parametrize("text", ["In 2019 Google released a new phone.", "The capital of France is Paris.",
                                  "I live in Germany and love it.", "We met in March and again on Friday."])
def test_places_and_dates_need_an_address_or_a_cue(detector, text):
    assert not [s for s in detector.find(text) if s.kind in ("CITY", "POSTCODE", "DATE")]


def test_documented_held_out_recall_is_the_measured_one(detector):
    """docs/privacy.md's recall table is what `detector_recall` measures on the held-out set now."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "privacy.md").read_text()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in doc.splitlines()
            if line.startswith(("| kind |", "| planted |", "| recall |"))}
    recall = detector_recall(load_pii_prompts("heldout"), detector)
    kinds = rows["kind"][:-1]
    assert kinds == list(recall["per_kind"])
    assert [int(x) for x in rows["planted"]] == [v["planted"] for v in recall["per_kind"].values()] + [recall["planted"]]
    assert rows["recall"] == [f"{v['recall']:.2f}" for v in recall["per_kind"].values()] + [f"{recall['overall']:.2f}"]
