"""Quasi-identifiers for pseudonymisation: postcodes, the city of an address or a residence, and dates
written in words (a date of birth in free text). Each alone is common; together, or next to a street
address, they single a person out (GDPR recital 26; HIPAA Safe Harbor lists "all geographic
subdivisions smaller than a state", ZIP codes and every element of a date except the year).

They are found by Presidio recognizers of ours whose regexes mark entities by named group, so one
match yields both the postcode and the city beside it ("10115 Berlin", "London NW1 6XE",
"Washington, DC 20500"). A city is recognised by where it stands (next to a postcode, after a street
address, after "I live in"), never by a list alone: "Paris" in "the capital of France is Paris" is
no one's address. Stand-ins keep the format (a UK postcode stays a valid UK postcode) and the country
(a German city becomes another German city), from Faker's place lists and data/cities.tsv.
"""

from __future__ import annotations

import importlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import regex
from presidio_analyzer import RecognizerResult
from presidio_analyzer.local_recognizer import LocalRecognizer
from presidio_analyzer.predefined_recognizers import CaPostalCodeRecognizer, UkPostcodeRecognizer

# Presidio entity of a date in words (day, month and year; after a birth cue also day and month, or
# month and year): always identifying, unlike DATE_TIME, whose matches are kept only with a day and a year.
IDENTIFYING_DATE = "IDENTIFYING_DATE"


def _months() -> dict[str, tuple[tuple[str, ...], ...]]:
    """Language -> (full month names, abbreviated or alternative ones), January first (data/months.tsv)."""
    out: dict[str, list[tuple[str, ...]]] = {}
    for line in resources.files("lambdasplit.privacy").joinpath("data/months.tsv").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            language, _, *names = line.split("\t")
            out.setdefault(language, []).append(tuple(names))
    return {language: tuple(forms) for language, forms in out.items()}


MONTHS = _months()
_MONTH_WORDS = sorted({m for forms in MONTHS.values() for names in forms for m in names}, key=len, reverse=True)
MONTH = "(?:" + "|".join(regex.escape(m) for m in _MONTH_WORDS) + ")"
_WEEKDAYS = {"Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday", "Montag", "Dienstag", "Mittwoch",
             "Donnerstag", "Freitag", "Samstag", "Sonntag", "Lundi", "Mardi", "Mercredi", "Jeudi", "Vendredi", "Samedi", "Dimanche"}

_DAY = r"\d{1,2}(?:st|nd|rd|th|er|\.|º|°)?"
_YEAR = r"(?:\d{4}|'\d{2})"
_DMY = rf"{_DAY}(?:\s+(?:of|de))?[\s\-/]+{MONTH}\.?(?:,|\s+(?:de|del|of))?[\s\-/]+{_YEAR}"
_MDY = rf"{MONTH}\.?[\s\-]+(?:the\s+)?{_DAY},?\s+{_YEAR}"
_BIRTH_CUE = (r"\b(?:born|birthday|birth\s*date|date\s+of\s+birth|DOB|D\.O\.B\.|geboren|Geburtstag|Geburtsdatum|née?|"
              r"nac(?:ido|ida|í)|fecha\s+de\s+nacimiento|nat[oa]|data\s+di\s+nascita|geboortedatum|nascid[oa]|"
              r"data\s+de\s+nascimento|född|födelsedatum|urodzon[ya]|urodził[ae]m\s+się|data\s+urodzenia|doğum\s+tarihi|doğdum)\b")

# Cities: capitalised words (with the linking words of place names), or an upper-case word after a postcode.
_CAP = r"\p{Lu}[\p{Ll}'’]+(?:-\p{L}[\p{Ll}'’]*)*"
_LINK = r"(?:am|an\s+der|upon|on|sur|sous|de|del|de\s+la|di|do|da|dos|la|le|les|en|im|bei|in\s+der|aan\s+den|aan\s+de|op)"
CITY = rf"(?:(?:St|Ste|Mt|Ft|San|Santa|São|Saint|Sankt|Bad|New|Den|Le|La|Los|Las|El)\.?\s+)?{_CAP}(?:\s+(?:{_LINK}\s+)?{_CAP}){{0,2}}"
_CITY_UPPER = r"\p{Lu}{3,}(?:[\s\-]\p{Lu}{2,}){0,2}(?!\p{Ll})"

_UK = "|".join(p.regex for p in UkPostcodeRecognizer.PATTERNS)
_CA = CaPostalCodeRecognizer.PATTERNS[0].regex  # the strict form, with its space
_US_STATES = ("AL|AK|AZ|AR|CA|CO|CT|DE|DC|FL|GA|HI|ID|IL|IN|IA|KS|KY|LA|ME|MD|MA|MI|MN|MS|MO|MT|NE|NV|NH|NJ|NM|NY|NC|ND|OH|OK|OR|PA|"
              "RI|SC|SD|TN|TX|UT|VT|VA|WA|WV|WI|WY|PR")
_CA_PROVINCES = "AB|BC|MB|NB|NL|NS|NT|NU|ON|PE|QC|SK|YT"
_ZIP = r"\d{5}(?:-\d{4})?"
# Postcodes written before the city: DE/FR/ES/IT/FI (5 digits, maybe "D-"), BR (5-3), PT (4-3), NL (4 digits 2 letters),
# AT/CH/BE/DK/NO (4 digits), PL (2-3), SE (3 2).
_BEFORE_CITY = r"\d{5}-\d{3}|(?:\p{Lu}{1,2}-)?\d{5}|\d{4}-\d{3}|\d{4}\s?\p{Lu}{2}(?!\p{L})|\d{4}|\d{2}-\d{3}|\d{3}\s\d{2}"
_ANY_POSTCODE = rf"{_UK}|{_CA}|{_ZIP}|\d{{5}}-\d{{3}}|\d{{4}}-\d{{3}}|\d{{4}}\s?[A-Z]{{2}}(?![A-Za-z])|\d{{2}}-\d{{3}}|\d{{3}}\s\d{{2}}|\d{{4,6}}"
_POSTCODE_CUE = (r"(?i:\b(?:zip(?:\s*code)?|post\s*code|postal\s*code|PLZ|Postleitzahl|code\s+postal|C\.P\.|CP|CEP|CAP|"
                 r"c[oó]digo\s+postal|kod\s+pocztowy|postnummer|posta\s+kodu|pin\s*code))\s*(?:is|:|#|no\.?|ist|est|es|è|é)?\s*")
_RESIDENCE_CUE = (r"(?i:\b(?:(?:I|we)\s+(?:now\s+)?(?:live|lived|reside|stay)|(?:he|she|they|who)\s+(?:lives?|resides?)|living|residing|"
                  r"resident|moved|moving|relocated|based|born|grew\s+up|wohne|wohnt|lebe|lebt|habite|habitons|vivo|vive|vivimos|abito|"
                  r"abita|woon|woont|mieszkam|mieszka|bor|moro|mora|yaşıyorum|oturuyorum)\s+(?:here\s+)?(?:in|at|to|of|near|à|a|en|w|i|em|"
                  r"no|na|nach)\s+)")
_PLACE_LABEL = (r"(?i:\b(?:city|town|hometown|place\s+of\s+residence|place\s+of\s+birth|Stadt|Wohnort|Ort|Geburtsort|ville|"
                r"lieu\s+de\s+naissance|ciudad|città|cidade|woonplaats|plaats|miejscowość|miasto|ort|şehir|il)\s*:\s*)")


@dataclass(frozen=True)
class Found:
    """One entity of a match: the Presidio entity type and [start, end) in the analysed text."""

    entity: str
    start: int
    end: int


class GroupRecognizer(LocalRecognizer):
    """A Presidio recognizer whose regexes name their entities as groups: `(?P<POSTCODE>...)\\s+(?P<CITY>...)`
    gives two results. `keep(found, text)` gets a match's entities and returns those it keeps, maybe
    narrowed (the words of a city run that are not the city dropped); refusing one part of a
    match ("2019" as a postcode) may refuse the rest."""

    def __init__(self, name: str, patterns: list[str], keep: Callable[[list[Found], str], list[Found]], score: float = 0.5) -> None:
        self.compiled = [regex.compile(p, regex.MULTILINE) for p in patterns]
        entities = sorted({g for p in self.compiled for g in p.groupindex})
        self.keep, self.score = keep, score
        super().__init__(supported_entities=entities, name=name, supported_language="en")

    def load(self) -> None:
        """Nothing to load: the patterns are compiled in __init__."""

    def analyze(self, text: str, entities: list[str], nlp_artifacts: object = None) -> list[RecognizerResult]:
        out = []
        for pattern in self.compiled:
            for match in pattern.finditer(text, overlapped=True):
                found = [Found(g, match.start(g), match.end(g)) for g, value in match.groupdict().items() if value is not None]
                out += [RecognizerResult(f.entity, f.start, f.end, self.score) for f in self.keep(found, text)]
        return out


def place_recognizer(street: str, not_place: frozenset[str]) -> GroupRecognizer:
    """Postcodes and the cities beside them. `street` matches a street address (a city follows it
    after a comma); `not_place` holds capitalised words that never start or end a city (sentence
    openers, street words, titles)."""
    city = rf"(?:{CITY}|{_CITY_UPPER})"
    patterns = [
        rf"(?<![\w+\-/.])(?P<POSTCODE>{_BEFORE_CITY}),?\s+(?P<CITY>{city})",  # 10115 Berlin, 75008 PARIS, 1015 CS Amsterdam
        rf"(?P<CITY>{CITY}),?\s+(?P<POSTCODE>{_UK})(?!\w)",  # London NW1 6XE
        rf"(?<![\w\-])(?P<POSTCODE>{_UK}|{_CA})(?!\w)",  # a UK or Canadian postcode alone
        # Washington, DC 20500; Austin, Texas 78701; Toronto, ON M5H 2S6
        rf"(?P<CITY>{CITY}),?\s+(?:{_US_STATES}|{_CA_PROVINCES}|{_state_names()})\.?,?\s+(?P<POSTCODE>{_ZIP}|{_CA})(?![\w\-])",
        rf"(?<![\w\-])(?:{_US_STATES})\.?\s+(?P<POSTCODE>{_ZIP})(?![\w\-])",  # NY 10001
        rf"{_POSTCODE_CUE}(?P<POSTCODE>{_ANY_POSTCODE})(?![\w\-])",  # zip code: 90210, PLZ 10115
        rf"(?i:{street})(?:\s+(?:N|S|E|W|NE|NW|SE|SW))?\s*,\s*(?P<CITY>{city})",  # 14 Elm Grove Road, Leeds
        rf"{_RESIDENCE_CUE}(?P<CITY>{CITY})",  # I live in Leeds
        rf"(?<=(?i:{_BIRTH_CUE})[^.\n]{{0,30}}\s(?i:in|a|à|en|em|w|i|op)\s+)(?P<CITY>{CITY})",  # born 14 March 1985 in Leeds
        rf"{_PLACE_LABEL}(?P<CITY>{city})",  # City: Leeds
    ]
    countries = _country_names()

    def keep(found: list[Found], text: str) -> list[Found]:
        if not all(_plausible_postcode(text, f) for f in found if f.entity == "POSTCODE"):
            return []
        cities = [_trim_city(f, text, not_place, countries) for f in found if f.entity == "CITY"]
        if None in cities and len(found) > 1:  # "1600 Pennsylvania": no city, so no postcode before it either
            return []
        return [f for f in found if f.entity == "POSTCODE"] + [c for c in cities if c is not None]

    return GroupRecognizer("lambdasplit-places", patterns, keep)


def date_recognizer() -> GroupRecognizer:
    """Dates written with a month name (14 March 1985, March 14th, 1985, 3. Mai 1990, 7 de julio de
    1992), and after a birth cue also a day and month or a month and year alone ("born in March 1985")."""
    partial = rf"{_DAY}(?:\s+(?:of|de))?\s+{MONTH}(?![\p{{L}}])|{MONTH}\.?,?\s+(?:of\s+|de\s+)?{_YEAR}|{MONTH}\s+{_DAY}(?!\d)"
    patterns = [
        rf"(?i)(?<![\w])(?P<{IDENTIFYING_DATE}>{_DMY}|{_MDY})(?![\w])",
        rf"(?i){_BIRTH_CUE}[^.\n\d]{{0,24}}?(?<![\w])(?P<{IDENTIFYING_DATE}>{partial})",
        r"(?<![\w.])(?P<DATE_TIME>\d{4}\.\d{1,2}\.\d{1,2})(?![\w]|\.\d)",  # 1985.03.14, which Presidio's patterns lack
    ]
    return GroupRecognizer("lambdasplit-dates", patterns, lambda found, text: found)


def _trim_city(found: Found, text: str, not_place: frozenset[str], countries: frozenset[str]) -> Found | None:
    """The city of a capitalised run: words that are not place words are dropped from either end
    ("Leeds Thank" -> "Leeds"); a country, a month or a weekday is no city."""
    words = list(regex.finditer(r"\S+", text[found.start:found.end]))
    while words and _not_city_word(words[0].group(), not_place):
        words.pop(0)
    while words and _not_city_word(words[-1].group(), not_place):
        words.pop()
    if not words:
        return None
    start, end = found.start + words[0].start(), found.start + words[-1].end()
    name = text[start:end]
    if name in countries or name.title() in countries:
        return None
    return Found("CITY", start, end)


def _not_city_word(word: str, not_place: frozenset[str]) -> bool:
    bare = word.strip(".,")
    return bare in not_place or bare.title() in _MONTH_TITLES or bare in _WEEKDAYS or not bare[:1].isupper()


_MONTH_TITLES = frozenset(m.title() for m in _MONTH_WORDS if len(m) > 3)


def _plausible_postcode(text: str, found: Found) -> bool:
    """Four bare digits that read as a year ("in 2019 Google") count only where an address puts
    them: after a comma, colon or line break, or at the start."""
    value = text[found.start:found.end]
    if not regex.fullmatch(r"\d{4}", value) or not 1900 <= int(value) <= 2099:
        return True
    before = text[:found.start].rstrip(" \t")
    return not before or before[-1] in ",:;\n("


def _state_names() -> str:
    """US state names as a regex alternation (Austin, Texas 78701)."""
    states = importlib.import_module("faker.providers.address.en_US").Provider.states
    return "|".join(regex.escape(s) for s in sorted(states.values() if isinstance(states, dict) else states, key=len, reverse=True))


@lru_cache(maxsize=1)
def _country_names() -> frozenset[str]:
    """Country names in the prompt set's languages (Faker's lists): "I live in Germany" names no
    city. (US states are not excluded: "New York" and "Washington" are cities too.)"""
    names: set[str] = set()
    for locale in ("en_US", "de_DE", "fr_FR", "es_ES", "it_IT", "nl_NL", "pt_BR"):
        names.update(getattr(importlib.import_module(f"faker.providers.address.{locale}").Provider, "countries", ()))
    return frozenset(names) | {"England", "Scotland", "Wales", "UK", "USA", "US", "EU", "Europe", "America", "Deutschland"}


@lru_cache(maxsize=1)
def city_gazetteer() -> dict[str, tuple[str, ...]]:
    """Country code -> city names: data/cities.tsv (large cities, where a detected city is looked up)
    and Faker's place lists (real places, for stand-ins)."""
    out: dict[str, list[str]] = {}
    text = resources.files("lambdasplit.privacy").joinpath("data/cities.tsv").read_text()
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            country, *names = line.split("\t")
            out.setdefault(country, []).extend(names)
    geo = importlib.import_module("faker.providers.geo").Provider
    for _, _, name, country, _ in geo.land_coords:
        if country in out and regex.fullmatch(r"\p{Lu}[\p{L}'’\- ]+", name):
            out[country].append(name)
    for locale, country in (("de_DE", "DE"), ("de_AT", "AT"), ("de_CH", "CH"), ("nl_NL", "NL"), ("pl_PL", "PL"), ("sv_SE", "SE"),
                            ("en_IN", "IN")):
        cities = importlib.import_module(f"faker.providers.address.{locale}").Provider.cities
        out[country].extend(c for c in cities if regex.fullmatch(r"\p{Lu}[\p{L}\- ]+", c))
    return {country: tuple(dict.fromkeys(names)) for country, names in out.items()}


@lru_cache(maxsize=1)
def _country_of_city() -> dict[str, str]:
    """City (case-folded) -> the first country whose list names it (the curated lists come first)."""
    out: dict[str, str] = {}
    for country, names in city_gazetteer().items():
        for name in names:
            out.setdefault(name.casefold(), country)
    return out


# Letters a city name shows when its country is not in the lists: the stand-in stays plausible.
_LETTER_COUNTRIES = (("äöüß", "DE"), ("åÅ", "SE"), ("łąęśżźćńŁŚŻ", "PL"), ("şğıİŞĞ", "TR"), ("ãõ", "PT"), ("ñ", "ES"),
                     ("éèêçàùâîô", "FR"), ("ìò", "IT"))


def city_country(city: str) -> str:
    """The country a city is in: looked up, else guessed from its letters; GB for plain ASCII names."""
    found = _country_of_city().get(city.casefold())
    if found:
        return found
    return next((country for letters, country in _LETTER_COUNTRIES if any(c in city for c in letters)), "GB")


def city_stand_in(real: str, rng: random.Random) -> str:
    """Another city of the same country, written in the same case style (LONDON -> LEEDS)."""
    pool = [c for c in city_gazetteer()[city_country(real)] if c.casefold() != real.casefold()]
    value = rng.choice(pool)
    return value.upper() if real.isupper() and len(real) > 1 else value


def postcode_format(real: str) -> regex.Pattern | None:
    """The pattern a redrawn postcode must match to stay valid: UK and Canadian postcodes restrict
    letters by position, Dutch ones never start with 0; digit-only ones take any digits."""
    for pattern in (rf"(?:{_UK})", _CA, r"[1-9]\d{3}\s?(?!S[ADS])[A-Z]{2}"):
        if regex.fullmatch(pattern, real):
            return regex.compile(pattern)
    return None


def month_stand_in(word: str, rng: random.Random) -> str:
    """Another month in the same language and form (full or abbreviated) and case as `word`."""
    for full, short in MONTHS.values():
        for names in (full, short):
            lowered = [n.casefold() for n in names]
            if word.casefold() in lowered:
                index = lowered.index(word.casefold())
                value = names[rng.choice([i for i in range(12) if i != index])]
                if word.isupper() and len(word) > 1:
                    return value.upper()
                return value[:1].upper() + value[1:] if word[:1].isupper() else value.lower()
    return word


def fix_ordinals(text: str) -> str:
    """English and French day ordinals after the day was redrawn (2th -> 2nd, 5er -> 5)."""
    def english(m: regex.Match) -> str:
        n = int(m.group(1))
        suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
        return m.group(1) + (suffix.upper() if m.group(2).isupper() else suffix)

    text = regex.sub(r"\b(\d+)(st|nd|rd|th|ST|ND|RD|TH)\b", english, text)
    return regex.sub(r"\b(\d+)er\b", lambda m: m.group(0) if m.group(1) == "1" else m.group(1), text)
