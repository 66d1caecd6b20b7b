"""Language codes: a client's code matched to a served one, and the names the web page shows.

LibreTranslate clients send ISO 639-1 codes (``de``). A run's pair is named by its config
(``data.src_lang``, ``data.tgt_lang``: any label), a multilingual model's languages by its own
codes: Marian ``deu`` (ISO 639-3, from ``>>deu<<``; sometimes with a script, ``cmn_Hans``),
NLLB ``deu_Latn``, mBART-50 ``de_DE``, M2M100 ``de``. ``matches`` takes a client's code to the
served codes it may mean, so that ``de`` reaches ``deu`` when that is the only German served.
"""

from __future__ import annotations

from collections.abc import Collection

LANGUAGE_NAMES = {
    "ar": "Arabic", "bg": "Bulgarian", "ca": "Catalan", "cs": "Czech", "da": "Danish", "de": "German",
    "el": "Greek", "en": "English", "es": "Spanish", "et": "Estonian", "eu": "Basque", "fa": "Persian",
    "fi": "Finnish", "fr": "French", "ga": "Irish", "he": "Hebrew", "hi": "Hindi", "hr": "Croatian",
    "hu": "Hungarian", "id": "Indonesian", "is": "Icelandic", "it": "Italian", "ja": "Japanese", "ko": "Korean",
    "lt": "Lithuanian", "lv": "Latvian", "nl": "Dutch", "no": "Norwegian", "pl": "Polish", "pt": "Portuguese",
    "ro": "Romanian", "ru": "Russian", "sk": "Slovak", "sl": "Slovenian", "sr": "Serbian", "sv": "Swedish",
    "th": "Thai", "tr": "Turkish", "uk": "Ukrainian", "vi": "Vietnamese", "zh": "Chinese",
}
"""Names of the ISO 639-1 codes LibreTranslate serves most."""

ISO_639_3 = {
    "ar": ("ara", "arb"), "bg": ("bul",), "ca": ("cat",), "cs": ("ces",), "da": ("dan",), "de": ("deu",),
    "el": ("ell",), "en": ("eng",), "es": ("spa",), "et": ("est", "ekk"), "eu": ("eus",), "fa": ("fas", "pes"),
    "fi": ("fin",), "fr": ("fra",), "ga": ("gle",), "he": ("heb",), "hi": ("hin",), "hr": ("hrv",),
    "hu": ("hun",), "id": ("ind",), "is": ("isl",), "it": ("ita",), "ja": ("jpn",), "ko": ("kor",),
    "lt": ("lit",), "lv": ("lav", "lvs"), "nl": ("nld",), "no": ("nor", "nob", "nno"), "pl": ("pol",),
    "pt": ("por",), "ro": ("ron",), "ru": ("rus",), "sk": ("slk",), "sl": ("slv",), "sr": ("srp",),
    "sv": ("swe",), "th": ("tha",), "tr": ("tur",), "uk": ("ukr",), "vi": ("vie",), "zh": ("zho", "cmn"),
}
"""The ISO 639-3 codes of each language of ``LANGUAGE_NAMES`` (the macrolanguage first, then
the individual languages models name instead: ``cmn`` for Chinese, ``nob`` for Norwegian)."""

_SHORT = {long: short for short, longs in ISO_639_3.items() for long in longs}


def _split(code: str) -> tuple[str, str]:
    """``deu_Latn`` -> (``deu``, ``Latn``); ``de`` -> (``de``, ``"")."""
    language, _, rest = code.replace("-", "_").partition("_")
    return language, rest


def _language(code: str) -> str:
    """The ISO 639-1 code of ``code``'s language where known (``deu_Latn`` -> ``de``), else its
    language part in lowercase."""
    language = _split(code)[0].lower()
    return _SHORT.get(language, language)


def language_name(code: str) -> str:
    """What the web page shows for a served code: ``German`` for ``de`` or ``deu``, ``Chinese
    (Hant)`` for ``zho_Hant``; the code itself for an unknown one."""
    name = LANGUAGE_NAMES.get(_language(code))
    if name is None:
        return code
    rest = _split(code)[1]
    return f"{name} ({rest})" if rest else name


def matches(code: str, served: Collection[str]) -> list[str]:
    """The served codes a client's ``code`` may mean: itself where served; else, for a bare
    language code, every served code of that language (``de`` -> ``deu``, ``deu_Latn`` or
    ``de_DE``; ``deu`` -> ``de``); else a served code differing only in case or ``-``/``_``."""
    if code in served:
        return [code]
    if _split(code)[1]:
        def spelled(text: str) -> str:
            return text.lower().replace("-", "_")
        return sorted(c for c in served if spelled(c) == spelled(code))
    language = _language(code)
    return sorted(c for c in served if _language(c) == language)
