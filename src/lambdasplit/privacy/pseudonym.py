"""On-device pseudonymisation: find the identifying spans of a prompt, replace each with a realistic
stand-in of the same kind before the head runs, and map the stand-ins back in the streamed answer.

The cloud can invert every hidden state it sees (docs/privacy.md) and still reads only stand-ins;
what it reads of a real identifier is exactly what the detector missed, so the audit reports the
detector's recall per kind next to the leak.

Detection is Presidio's analyzer with its pattern recognizers (e-mail, phone, credit card, IBAN, IP,
dates) on its no-op NLP engine (no spaCy model is loaded or downloaded), plus recognizers of ours for
names (Faker's first- and last-name lists of many locales, with capitalisation and title/context
cues), account and ID numbers, street addresses, and the quasi-identifiers of privacy/quasi.py
(postcodes, the city of an address, dates written in words). Stand-ins come from Faker in the locale
the real value looks like it came from, keep the format (separators, digit counts, check digits) and
are kept consistent: the same real value always gets the same stand-in within one `Pseudonymizer`.

Why one file over 500 lines: the detector's patterns, the stand-ins that must keep their format
and the restorer that maps them back share one vocabulary of kinds, locales and text folding;
quasi-identifiers are apart (`quasi.py`), as are decoy rows (`decoys.py`).
"""

from __future__ import annotations

import importlib
import logging
import random
import re
import secrets
import string
import unicodedata
from dataclasses import dataclass, field
from functools import lru_cache

from lambdasplit.privacy import quasi

log = logging.getLogger(__name__)

KINDS = ("PERSON", "EMAIL", "PHONE", "CREDIT_CARD", "IBAN", "ACCOUNT", "ID", "ADDRESS", "POSTCODE", "CITY", "DATE", "IP")
LOCALES = ("en_US", "en_GB", "de_DE", "fr_FR", "es_ES", "it_IT", "pt_BR", "nl_NL", "sv_SE", "tr_TR", "en_IN", "pl_PL")
# Presidio's entity names -> ours.
_PRESIDIO_KINDS = {"EMAIL_ADDRESS": "EMAIL", "PHONE_NUMBER": "PHONE", "CREDIT_CARD": "CREDIT_CARD", "IBAN_CODE": "IBAN",
                   "IP_ADDRESS": "IP", "DATE_TIME": "DATE", quasi.IDENTIFYING_DATE: "DATE"}
# Which kind wins when two detected spans of equal length overlap.
_PRIORITY = {k: i for i, k in enumerate(("EMAIL", "IBAN", "CREDIT_CARD", "IP", "DATE", "POSTCODE", "PHONE", "ACCOUNT", "ID", "ADDRESS",
                                         "CITY", "PERSON"))}
_PHONE_REGIONS = ("US", "GB", "DE", "FR", "ES", "IT", "NL", "SE", "PL", "BR", "IN", "CH", "AT", "PT", "MX", "IE", "BE", "TR")

_UPPER = "A-ZÀ-ÖØ-ÞĀ-ſ"
_WORD = rf"[{_UPPER}][a-zà-öø-ÿā-ſ'’\-]+"
_PARTICLE_WORDS = ("van der", "van den", "van", "von", "de la", "de", "da", "del", "der", "di", "du", "le", "la", "ten", "bin", "al")
_PARTICLES = "(?:" + "|".join(_PARTICLE_WORDS) + ")"
_CAPITALISED_RUN = re.compile(rf"(?<![\w@.])({_WORD}(?:\s+(?:{_PARTICLES}\s+)?{_WORD}){{0,3}})")
_TITLES = {"Mr", "Mrs", "Ms", "Miss", "Dr", "Prof", "Herr", "Frau", "Sr", "Sra", "Srta", "Don", "Doña", "Mme", "Mlle", "M",
           "Signor", "Signora", "Sig", "Dott", "Dhr", "Mevr", "Pan", "Pani", "Bay", "Bayan"}
_CONTEXT = re.compile(r"(?:my name is|i am|i'm|named|called|patient|name:|signed|regards,|from|for|to|with|contact|ich heiße|ich bin|"
                      r"me llamo|soy|je m'appelle|je suis|mi chiamo|sono|ik ben|mijn naam is|jag heter|nazywam się|adım|meu nome é|"
                      r"chamo-me|liebe[rs]?|dear|hallo|hola|hi|hello|cher|chère|caro|cara|querid[oa])\s*$", re.IGNORECASE)
_NOT_NAMES = {"I", "The", "A", "An", "My", "Our", "Please", "Dear", "Hi", "Hello", "Thanks", "Thank", "Can", "Could", "Would", "Write",
              "Draft", "Help", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday", "January", "February",
              "March", "April", "May", "June", "July", "August", "September", "October", "November", "December", "Street", "Road",
              "Avenue", "Bank", "Hospital", "Clinic", "Doctor", "English", "German", "French", "Spanish", "Italian", "Is", "It",
              "What", "How", "Hola", "Hallo", "Bonjour", "Ciao", "Liebe", "Lieber", "Sehr", "Geehrte", "Herr", "Frau", "Avenida",
              "Calle", "Rue", "Via", "Plaza", "Piazza", "Platz", "Maple", "Park", "Grace", "Will", "Mark", "Summer", "Winter"}
# Street suffixes (separate words) and compound endings, in the languages of the prompt set.
_STREET_WORDS = r"(?:Street|St\.?|Road|Rd\.?|Avenue|Ave\.?|Lane|Ln\.?|Drive|Dr\.?|Close|Way|Court|Place|Grove|Crescent|Terrace|Boulevard|Blvd\.?)"
_STREET_PREFIX = r"(?:Calle|Avenida|Av\.|Rua|Rue|Avenue|Boulevard|Via|Viale|Piazza|Plaza|Paseo|Carrer|Praça|ulica|ul\.)"
_STREET_COMPOUND = r"(?:straße|strasse|str\.|weg|gasse|allee|platz|laan|straat|gracht|plein|vägen|gatan|sokak|caddesi)"
_ADDRESS_PATTERNS = (
    rf"\b\d{{1,5}}[a-zA-Z]?,?\s+(?:{_WORD}\s+){{0,3}}{_STREET_WORDS}(?![\w])",  # 14 Elm Grove Road
    # Calle Mayor 5, Via Roma, 12 (after a comma at most 4 digits: "Rue de Rivoli, 75001 Paris" ends in a postcode)
    rf"\b{_STREET_PREFIX}\s+(?:(?:de|del|de la|da|do|dos|des|di|della|du|le|la)\s+)?(?:{_WORD}\s*){{1,3}}"
    rf"(?:,\s*(?:n[º°.]?\s*)?\d{{1,4}}|(?:n[º°.]?\s*)?\d{{1,5}})[a-zA-Z]?\b",
    rf"\b\d{{1,5}},?\s+{_STREET_PREFIX}\s+(?:(?:de|del|de la|du|des|le|la)\s+)?(?:{_WORD}\s*){{1,3}}",  # 12 rue de la Paix
    rf"\b[{_UPPER}][a-zà-öø-ÿß]+{_STREET_COMPOUND}\s*\d{{1,5}}[a-zA-Z]?\b",  # Hauptstraße 5
)


@dataclass(frozen=True)
class Span:
    """One detected identifier: [start, end) in the text it was found in."""

    start: int
    end: int
    kind: str
    text: str


@dataclass(frozen=True)
class NameLexicon:
    """Faker's first and last names across locales: which locale and gender a name looks like."""

    first: dict[str, tuple[str, str]]  # name -> (locale, "m"|"f"|"")
    last: dict[str, str]  # name -> locale
    by_locale: dict[str, dict[str, tuple[str, ...]]]  # locale -> {"m", "f", "last"} -> names

    def is_name_word(self, word: str) -> bool:
        return word in self.first or word in self.last


@lru_cache(maxsize=1)
def name_lexicon() -> NameLexicon:
    first: dict[str, tuple[str, str]] = {}
    last: dict[str, str] = {}
    by_locale: dict[str, dict[str, tuple[str, ...]]] = {}
    for locale in LOCALES:
        provider = importlib.import_module(f"faker.providers.person.{locale}").Provider
        male = tuple(getattr(provider, "first_names_male", ()) or ())
        female = tuple(getattr(provider, "first_names_female", ()) or ())
        last_names = tuple(n for n in (getattr(provider, "last_names", ()) or ()) if n.isalpha() and n[0].isupper() and len(n) > 2)
        if len(last_names) < 20:  # pl_PL ships one placeholder surname
            last_names = ()
        by_locale[locale] = {"m": male, "f": female, "last": last_names}
        for gender, names in (("m", male), ("f", female)):
            for name in names:
                first.setdefault(name, (locale, gender))
        for name in last_names:
            last.setdefault(name, locale)
    for word in _NOT_NAMES:
        first.pop(word, None)
        last.pop(word, None)
    return NameLexicon(first, last, by_locale)


class Detector:
    """Finds identifying spans with Presidio's pattern recognizers and ours; runs offline on the CPU.

    Everything is analysed as language "en": pattern recognizers are language-neutral regexes, and the
    no-op NLP engine gives no tokens to use per language anyway."""

    def __init__(self, min_score: float = 0.3) -> None:
        self.min_score = min_score
        self.engine = _analyzer()
        self.lexicon = name_lexicon()

    def find(self, text: str) -> list[Span]:
        results = [r for r in self.engine.analyze(text, language="en") if r.score >= self.min_score]
        found = [Span(r.start, r.end, _PRESIDIO_KINDS.get(r.entity_type, r.entity_type), text[r.start:r.end]) for r in results
                 if r.entity_type != "DATE_TIME" or _is_identifying_date(text[r.start:r.end])]
        found += self._names(text)
        return _resolve(found)

    def _names(self, text: str) -> list[Span]:
        spans = []
        for match in _CAPITALISED_RUN.finditer(text):
            words = [(m.start() + match.start(), m.group()) for m in re.finditer(r"\S+", match.group())]
            # Drop leading capitalised words that are not names ("Patient", "I'm") when a known name follows.
            while words and words[0][1].rstrip(".") not in _TITLES and not self.lexicon.is_name_word(words[0][1]) and (
                    words[0][1] in _NOT_NAMES or "'" in words[0][1] or any(w in self.lexicon.first for _, w in words[1:])):
                words.pop(0)
            if not words:
                continue
            titled = words[0][1].rstrip(".") in _TITLES or _preceding_title(text, words[0][0])
            if words[0][1].rstrip(".") in _TITLES:
                words.pop(0)
            if not words:
                continue
            names = [w for _, w in words]
            first_known = names[0] in self.lexicon.first
            any_known = any(self.lexicon.is_name_word(w) for w in names)
            cue = titled or bool(_CONTEXT.search(text[: words[0][0]]))
            sentence_start = _sentence_start(text, words[0][0])
            if len(names) >= 2 and (first_known or (any_known and not sentence_start) or cue):
                pass
            elif len(names) == 1 and (names[0] in self.lexicon.first or (cue and names[0] in self.lexicon.last)) and (cue or not sentence_start):
                pass
            elif len(names) == 1 and titled:
                pass
            else:
                continue
            start, end = words[0][0], words[-1][0] + len(words[-1][1])
            spans.append(Span(start, end, "PERSON", text[start:end]))
        return spans


def _sentence_start(text: str, at: int) -> bool:
    before = text[:at].rstrip()
    return not before or before[-1] in ".!?:\n\"'¿¡"


def _preceding_title(text: str, at: int) -> bool:
    words = text[:at].split()
    return bool(words) and words[-1].rstrip(".") in _TITLES


def _is_identifying_date(text: str) -> bool:
    """A day-precise date with a year (a birth date, an appointment): weekdays and bare years are not identifiers."""
    return sum(c.isdigit() for c in text) >= 5


def _resolve(spans: list[Span]) -> list[Span]:
    """Keep non-overlapping spans, longest first, then by kind priority."""
    kept: list[Span] = []
    for span in sorted(spans, key=lambda s: (-(s.end - s.start), _PRIORITY.get(s.kind, 99))):
        if all(span.end <= k.start or span.start >= k.end for k in kept):
            kept.append(span)
    return sorted(kept, key=lambda s: s.start)


@lru_cache(maxsize=1)
def _analyzer():
    """Presidio's AnalyzerEngine on the no-op NLP engine with pattern recognizers only."""
    from presidio_analyzer import AnalyzerEngine, Pattern, PatternRecognizer, RecognizerRegistry
    from presidio_analyzer.nlp_engine import NoOpNlpEngine
    from presidio_analyzer.predefined_recognizers import (
        CreditCardRecognizer,
        DateRecognizer,
        EmailRecognizer,
        IbanRecognizer,
        IpRecognizer,
        PhoneRecognizer,
    )

    class OfflineEmailRecognizer(EmailRecognizer):
        """Presidio's e-mail regex without its top-level-domain check, which downloads the public suffix list."""

        def validate_result(self, pattern_text: str) -> bool | None:
            return None

    registry = RecognizerRegistry(supported_languages=["en"])
    for recognizer in (OfflineEmailRecognizer(), CreditCardRecognizer(), IbanRecognizer(), IpRecognizer(), DateRecognizer(),
                       PhoneRecognizer(supported_regions=_PHONE_REGIONS)):
        registry.add_recognizer(recognizer)
    ours = {
        # International or trunk-prefixed numbers the phonenumbers library rejects (fictional ranges, odd grouping).
        "PHONE": [Pattern("phone", r"(?<![\w+])(?:\+\d{1,3}[\s.\-]?(?:\(0\)\s?)?|\(?0)\d{1,5}\)?(?:[\s.\-]?\d{2,5}){1,4}(?!\w)", 0.5)],
        # Account, sort and policy numbers: digit groups joined by dashes/spaces, or long digit runs.
        "ACCOUNT": [Pattern("grouped", r"(?<![\w\-])\d{2,6}(?:[\-/ ]\d{2,8}){1,4}(?![\w\-])", 0.35),
                    Pattern("run", r"(?<!\w)\d{6,18}(?!\w)", 0.4)],
        # Identifiers mixing letters and digits: passports, patient, employee and insurance numbers, national IDs.
        "ID": [Pattern("mixed", r"(?<![\w\-])(?=[A-Z0-9\-]*\d)(?=[A-Z0-9\-]*[A-Z])[A-Z0-9][A-Z0-9\-]{4,17}[A-Z0-9](?![\w\-])", 0.4),
               Pattern("ssn", r"(?<!\d)\d{3}-\d{2}-\d{4}(?!\d)", 0.5)],
        "ADDRESS": [Pattern(f"address{i}", p, 0.5) for i, p in enumerate(_ADDRESS_PATTERNS)],
    }
    for kind, patterns in ours.items():
        registry.add_recognizer(PatternRecognizer(supported_entity=kind, patterns=patterns, supported_language="en", name=f"lambdasplit-{kind}"))
    not_place = frozenset(_NOT_NAMES | _TITLES | {"Please", "Thanks", "Regards", "Best", "Send", "Ship", "Post", "Mail", "Our", "Your",
                                                  "Their", "His", "Her", "We", "You", "He", "She", "They", "This", "That", "Yes", "No",
                                                  "ZIP", "PLZ", "CEP", "CAP", "CP", "PIN", "PO", "Box"})
    registry.add_recognizer(quasi.place_recognizer("|".join(_ADDRESS_PATTERNS), not_place))
    registry.add_recognizer(quasi.date_recognizer())
    engine = NoOpNlpEngine(models=[{"lang_code": "en", "model_name": "none"}])
    return AnalyzerEngine(registry=registry, nlp_engine=engine, supported_languages=["en"])


class StandIns:
    """Realistic stand-ins of one kind each, consistent per real value.

    `seed=None` draws from `secrets` (the device's real use: a stand-in must not be predictable by the
    cloud); a seed makes tests and the audit reproducible."""

    def __init__(self, seed: int | None = None) -> None:
        self.rng = random.Random(secrets.randbits(64) if seed is None else seed)
        self.lexicon = name_lexicon()
        self.values: dict[tuple[str, str], str] = {}
        self.reals: dict[tuple[str, str], str] = {}  # the real value as first written
        self.name_parts: dict[str, str] = {}  # real first/last name -> stand-in part

    def fork(self, seed: int) -> StandIns:
        """A copy that keeps every stand-in given so far and draws new ones from `seed` (decoy rows try several)."""
        other = StandIns(seed)
        other.values, other.reals, other.name_parts = dict(self.values), dict(self.reals), dict(self.name_parts)
        return other

    def get(self, kind: str, real: str) -> str:
        key = (kind, _normal(real))
        if key not in self.values:
            self.values[key] = self._new(kind, real)
            self.reals[key] = real
        return self.values[key]

    def fresh(self, kind: str, real: str) -> str:
        """A new stand-in, not remembered (decoys sample several to match token lengths)."""
        return self._new(kind, real, remember=False)

    def _new(self, kind: str, real: str, remember: bool = True) -> str:
        for _ in range(20):
            value = self._draw(kind, real, remember)
            if _normal(value) != _normal(real):
                return value
        return value

    def _draw(self, kind: str, real: str, remember: bool) -> str:
        if kind == "DOMAIN":
            return self._domain(real)
        if kind == "PERSON":
            return self._person(real, remember)
        if kind == "EMAIL":
            return self._email(real, remember)
        if kind == "CREDIT_CARD":
            return _luhn_fix(self._digits(real, keep_prefix=1))  # the issuer digit keeps it a plausible card
        if kind == "IBAN":
            return _iban_fix(self._digits(real, keep_prefix=2))
        if kind == "DATE":
            return self._date(real)
        if kind == "IP":
            return ".".join(str(self.rng.randint(1, 254)) for _ in range(4)) if real.count(".") == 3 else self._digits(real)
        if kind == "ADDRESS":
            return self._address(real)
        if kind == "POSTCODE":
            return self._postcode(real)
        if kind == "CITY":
            return quasi.city_stand_in(real, self.rng)
        if kind == "PHONE":
            return self._digits(real, keep_prefix=_country_prefix(real))
        return self._digits(real)

    def _person(self, real: str, remember: bool) -> str:
        words = real.split()
        out = []
        for i, word in enumerate(words):
            if word.lower() in {p.split()[0] for p in _PARTICLE_WORDS}:
                out.append(word)
                continue
            role = "first" if i == 0 and (len(words) > 1 or word in self.lexicon.first) else "last"
            if remember and word in self.name_parts:
                out.append(self.name_parts[word])
                continue
            value = self._name_part(word, role)
            if remember:
                self.name_parts[word] = value
            out.append(value)
        return " ".join(out)

    def _name_part(self, word: str, role: str) -> str:
        locale, gender = self.lexicon.first.get(word, (self.lexicon.last.get(word, "en_US"), ""))
        lists = self.lexicon.by_locale.get(locale) or self.lexicon.by_locale["en_US"]
        if role == "first":
            pool = lists[gender] if gender else lists["m"] + lists["f"]
        else:
            pool = lists["last"] or self.lexicon.by_locale["en_US"]["last"]
        pool = [p for p in pool if p != word] or list(self.lexicon.by_locale["en_US"]["last"])
        return self.rng.choice(pool)

    def _email(self, real: str, remember: bool) -> str:
        """Derived from the stand-in of the name it was built from, when it was (m.okafor -> j.lopez)."""
        local, _, domain = real.partition("@")
        new_local = local
        for part, stand_in in sorted(self.name_parts.items(), key=lambda kv: -len(kv[0])):
            folded, replacement = _fold(part), _fold(stand_in)
            if len(folded) > 1 and folded in new_local.lower():
                new_local = re.sub(re.escape(folded), replacement, new_local, flags=re.IGNORECASE)
        for part, stand_in in self.name_parts.items():  # initials: m.okafor
            pattern = rf"(^|[._\-]){re.escape(_fold(part)[:1])}(?=[._\-])"
            if _fold(part) and re.search(pattern, new_local):
                new_local = re.sub(pattern, lambda m, s=stand_in: m.group(1) + _fold(s)[:1], new_local, count=1)
                break
        if new_local == local:
            new_local = self._letters(local)
        return f"{new_local}@{self.get('DOMAIN', domain) if remember else self._domain(domain)}"

    def _domain(self, domain: str) -> str:
        tld = domain.split(".", 1)[1] if "." in domain else "com"
        word = _fold(self.rng.choice(self.lexicon.by_locale["en_US"]["last"]))
        return f"{word}{self.rng.choice(['mail', 'net', 'post', 'web', ''])}.{tld}"

    def _letters(self, text: str) -> str:
        return "".join(self.rng.choice(string.ascii_lowercase) if c.isalpha() else
                       str(self.rng.randint(0, 9)) if c.isdigit() else c for c in text)

    def _digits(self, text: str, keep_prefix: int = 0) -> str:
        """Format-preserving: digits -> random digits (no new leading zero), letters -> random letters of the same case."""
        out = list(text[:keep_prefix])
        for i, c in enumerate(text[keep_prefix:]):
            if c.isdigit():
                out.append(str(self.rng.randint(1 if c != "0" and i == 0 else 0, 9)))
            elif c.isalpha() and c.isascii():
                letter = self.rng.choice(string.ascii_uppercase)
                out.append(letter if c.isupper() else letter.lower())
            else:
                out.append(c)
        return "".join(out)

    def _date(self, real: str) -> str:
        """Same format; a 4-digit (or > 31) group is a year and moves by up to 6 years, a group > 12 is a day
        (redrawn 1-28), any other a day or month (redrawn 1-12): valid in every field order. A month
        name becomes another month of its language, and English and French ordinals follow the day."""
        numeric = not re.search(r"[^\W\d_]", real)  # 03/07/1985 keeps its zero padding; 3 March 1985 gets none

        def redraw(m: re.Match) -> str:
            g = m.group()
            n = int(g)
            if len(g) == 4:
                return str(max(1900, n + self.rng.randint(-6, 6)))
            if n > 31:
                return f"{(n + self.rng.randint(-6, 6)) % 100:02d}"
            day = str(self.rng.randint(1, 28 if n > 12 else 12))
            return day.zfill(len(g)) if numeric or g.startswith("0") else day

        value = re.sub(r"\d+", redraw, real)
        value = re.sub(r"[^\W\d_]+", lambda m: quasi.month_stand_in(m.group(), self.rng), value)
        return quasi.fix_ordinals(value)

    def _postcode(self, real: str) -> str:
        """Digits and letters redrawn in place, until the result is valid where the format restricts
        them (UK, Canada, the Netherlands); a country prefix ("D-") is kept."""
        prefix = re.match(r"[A-Z]{1,2}-", real)
        valid = quasi.postcode_format(real)
        value = real
        for _ in range(100):
            value = self._digits(real, keep_prefix=prefix.end() if prefix else 0)
            if valid is None or valid.fullmatch(value):
                break
        return value

    def _address(self, real: str) -> str:
        """House numbers redrawn; the street's name words replaced by a surname of the same locale; the street type kept."""
        keep = re.compile(rf"^(?:{_STREET_WORDS}|{_STREET_PREFIX}|de|del|de la|da|do|dos|des|di|della|du|le|la|n[º°.]?)$", re.IGNORECASE)
        out = []
        for token in re.split(r"(\s+|,)", real):
            if not token or token.isspace() or token == ",":
                out.append(token)
            elif token[:1].isdigit():
                out.append(self._digits(token))
            elif keep.match(token):
                out.append(token)
            else:
                compound = re.search(rf"{_STREET_COMPOUND}$", token)
                stem = self.rng.choice(self.lexicon.by_locale["de_DE" if compound else "en_GB"]["last"])
                out.append(stem + compound.group() if compound else stem)
        return "".join(out)


def _country_prefix(phone: str) -> int:
    """Keep "+44 " of an international number: the country is not the identifier and it keeps the answer's format."""
    m = re.match(r"\+\d{1,3}[\s.\-]?", phone)
    return m.end() if m else 0


def _luhn_fix(number: str) -> str:
    digits = [int(c) for c in number if c.isdigit()]
    if len(digits) < 12:
        return number
    total = 0
    for i, d in enumerate(reversed(digits[:-1])):
        total += sum(divmod(d * 2, 10)) if i % 2 == 0 else d
    check = (10 - total % 10) % 10
    last = max(i for i, c in enumerate(number) if c.isdigit())
    return number[:last] + str(check) + number[last + 1:]


def _iban_fix(iban: str) -> str:
    """Valid mod-97 check digits for a redrawn IBAN (its country letters were kept), in the original grouping."""
    compact = re.sub(r"\s", "", iban)
    if len(compact) < 15:
        return iban
    body = compact[4:]
    country = compact[:2].upper()
    numeric = "".join(str(int(c, 36)) for c in (body + country + "00").upper())
    check = 98 - int(numeric) % 97
    fixed = f"{country}{check:02d}{body}"
    out, it = [], iter(fixed)
    for c in iban:
        out.append(c if c.isspace() else next(it))
    return "".join(out)


def _fold(text: str) -> str:
    """Lowercase ASCII form used in e-mail local parts (Müller -> muller)."""
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()


def _normal(text: str) -> str:
    return " ".join(text.split()).casefold()


@dataclass
class Pseudonymized:
    """A pseudonymised text and where its stand-ins are (`spans` index into `text`; `span.text` is the stand-in)."""

    text: str
    spans: list[Span]
    originals: list[Span]  # the detected real spans, indexed into the original text


@dataclass
class Pseudonymizer:
    """Replaces identifiers with consistent stand-ins and maps them back; one per conversation.

    The mapping lives only on the device. Restoration replaces every stand-in (and each stand-in name
    part, so "Maria" alone maps back to "John") by its real value, longest first."""

    detector: Detector = field(default_factory=Detector)
    stand_ins: StandIns = field(default_factory=StandIns)
    kinds: tuple[str, ...] = KINDS

    def pseudonymize(self, text: str) -> Pseudonymized:
        originals = [s for s in self.detector.find(text) if s.kind in self.kinds]
        # Names first, so e-mails built from them can be derived from their stand-ins.
        for span in sorted(originals, key=lambda s: s.kind != "PERSON"):
            self.stand_ins.get(span.kind, span.text)
        pieces, spans, at, length = [], [], 0, 0
        for span in originals:
            pieces.append(text[at:span.start])
            length += span.start - at
            value = self.stand_ins.get(span.kind, span.text)
            spans.append(Span(length, length + len(value), span.kind, value))
            pieces.append(value)
            length += len(value)
            at = span.end
        pieces.append(text[at:])
        return Pseudonymized("".join(pieces), spans, originals)

    def pseudonymize_messages(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        """Every message of a conversation; assistant turns too (they were restored before being shown)."""
        return [{**m, "content": self.pseudonymize(str(m.get("content", ""))).text} for m in messages]

    def reverse_map(self) -> dict[str, str]:
        """stand-in -> real value, including each name part."""
        out = {v: self.stand_ins.reals[k] for k, v in self.stand_ins.values.items() if k[0] != "DOMAIN"}
        for real, stand_in in self.stand_ins.name_parts.items():
            out.setdefault(stand_in, real)
        return out

    def restore(self, text: str, before: str = "") -> str:
        """`text` with every stand-in mapped back; `before` is text already shown just before it
        (context for the word boundary only, not returned).

        `text` is taken to end where the answer ends: a stand-in cut short there (the token limit
        fell inside it) stays as written, since restoring the name parts it holds would splice a
        real name with a piece of a stand-in ("Rose Carr" of "Rose Carrillo" -> "Margaret Carr")."""
        mapping = self.reverse_map()
        if not mapping:
            return text
        whole = before + text
        cut = _partial_stand_in(whole, mapping, len(before))
        return self._restore_complete(whole[:cut], mapping, len(before)) + whole[cut:]

    def _restore_complete(self, whole: str, mapping: dict[str, str], shown: int) -> str:
        """`whole[shown:]` with every stand-in mapped back (`whole[:shown]` is word-boundary context)."""
        if len(whole) <= shown:
            return ""
        # Whole words only: a stand-in surname such as "White" must not rewrite "whiteboard". The model
        # may re-case a stand-in it copies ("Mcfarland" -> "McFarland"): a capitalised variant is
        # restored too, a lower-case one ("white") is an ordinary word and stays.
        pattern = re.compile("|".join(rf"(?<!\w){re.escape(k)}(?!\w)" for k in sorted(mapping, key=len, reverse=True)),
                             re.IGNORECASE)

        def real(match: re.Match) -> str:
            found = match.group()
            if match.start() < shown:
                return found
            if found in mapping:
                return mapping[found]
            if not found[:1].isupper():
                return found
            return next((v for k, v in mapping.items() if re.fullmatch(re.escape(k), found, re.IGNORECASE)), found)

        return pattern.sub(real, whole)[shown:]

    def restorer(self) -> StreamRestorer:
        return StreamRestorer(self)


def _partial_stand_in(text: str, mapping: dict[str, str], start: int) -> int:
    """Where a stand-in cut short by the end of `text` begins (at or after `start`), or len(text):
    the earliest word start from which the rest is a proper prefix of a stand-in and, trailing
    spaces aside, not a whole one ("Rose Carr" of "Rose Carrillo"; "Rose " is the whole part "Rose")."""
    keys = {k.casefold() for k in mapping}
    longest = max(map(len, keys))
    for at in range(max(start, len(text) - longest), len(text)):
        if at and _WORD.match(text[at - 1]):
            continue
        rest = text[at:].casefold()
        if rest.rstrip() not in keys and any(k.startswith(rest) for k in keys):
            return at
    return len(text)


class StreamRestorer:
    """Restores streamed text piece by piece, equal to restoring it whole: text from a word start
    that might still grow into a stand-in, or is one that the next character may turn into a longer
    word ("White" / "Whiteboard"), is held back until it cannot (the way stop strings are held back)."""

    def __init__(self, pseudonymizer: Pseudonymizer) -> None:
        self.pseudonymizer = pseudonymizer
        self.keys = [k.lower() for k in pseudonymizer.reverse_map()]
        self.pending = ""
        self.shown = ""  # the last character shown: the word-boundary context of the next piece

    def feed(self, text: str) -> str:
        self.pending += text
        hold = next((p for p in range(len(self.pending)) if self._may_begin(p)), len(self.pending))
        ready, self.pending = self.pending[:hold], self.pending[hold:]
        return self._show(ready)

    def flush(self) -> str:
        ready, self.pending = self.pending, ""
        return self._show(ready)

    def _may_begin(self, at: int) -> bool:
        """A stand-in may begin at `at`: a word starts there and the rest is the start of one (or all of it)."""
        before = self.pending[at - 1] if at else self.shown
        if before and _WORD.match(before):
            return False
        rest = self.pending[at:].lower()
        return any(k.startswith(rest) for k in self.keys)

    def _show(self, ready: str) -> str:
        if not ready:
            return ""
        out = self.pseudonymizer.restore(ready, self.shown)
        self.shown = ready[-1]
        return out


_WORD = re.compile(r"\w")
