"""Device enrichment: device class and browser/OS/device details from a User-Agent.

``DeviceDetector(cache_size).detect(user_agent, hints)`` (or the module-level
``detect``) returns a :class:`Device`:

* ``device_type``: ``desktop``, ``mobile``, ``tablet``, ``bot`` or ``other`` (TVs,
  set-top boxes, media players, consoles, cars, wearables, XR headsets);
* ``details``: a small dict for ``custom_data`` holding only what is known, e.g.::

    {"browser": {"family": "Chrome Mobile", "version": "120.0.0"},
     "os": {"family": "Android", "version": "14"},
     "device": {"brand": "Samsung", "model": "SM-S918B"}}

Names and versions come from ``user-agents`` (ua-parser's regexes). The device class
comes from the rules below, which cover what ua-parser misses: bots it does not list,
smart TVs and boxes running Android, tablets that send "Mobile", Android laptops.

Bad input never raises: ``None``, non-strings and blank strings give
``Device(None, None)``. Any other string is classified; one that names no platform at
all (``curl/8.4``, ``NodePing``) is taken for an automated client, i.e. ``bot``.

Results are cached (LRU) per User-Agent, and per (User-Agent, client hints) when hints
are given. Cached ``Device`` objects are shared between calls: treat ``details`` as
read-only (copy before adding keys).
"""

from __future__ import annotations

import functools
import re
import threading
from dataclasses import dataclass
from typing import Any, Mapping

import user_agents
from ua_parser import user_agent_parser
from user_agents.parsers import TABLET_DEVICE_FAMILIES, UserAgent

__all__ = ["DEVICE_TYPES", "Device", "DeviceDetector", "NO_DEVICE", "detect"]

DEVICE_TYPES = ("desktop", "mobile", "tablet", "bot", "other")

# Longer strings are cut before parsing: real UAs are shorter (the longest of the 3,762
# in shared/ua has 361 characters), and ua-parser's cost grows with length: ~10 ms at
# 512 characters of junk, so that a flood of unique junk cannot stall a worker.
MAX_UA_LENGTH = 512


@dataclass(frozen=True, slots=True)
class Device:
    device_type: str | None
    details: dict[str, dict[str, str]] | None


NO_DEVICE = Device(None, None)

# ---------------------------------------------------------------------------
# Rules. Each is a general marker: a platform token, a product line, a vendor's
# model-naming scheme. Patterns written in lower case run on the lower-cased UA
# (Python's re.IGNORECASE is ~8x slower on these alternations); the few where case
# carries meaning ("Mobile", "TV") run on the original string.


def _alternation(words: str) -> str:
    """A regex matching any of the space-separated literal ``words`` ("_" stands for a
    space), factored into a trie. Python's re tries every alternative at every
    position, so sharing prefixes makes these long word lists ~4x faster."""
    trie: dict = {}
    for word in words.split():
        node = trie
        for ch in word.replace("_", " "):
            node = node.setdefault(ch, {})
        node[""] = {}

    def emit(node: dict) -> str:
        branches = [re.escape(ch) + emit(child) for ch, child in sorted(node.items()) if ch]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        if "" in node:  # a word ends here; longer ones go on
            return body + "?" if len(branches) == 1 and len(body) == 1 else "(?:" + body + ")?"
        return body

    return emit(trie)


# Automated clients that say so: crawler, monitor and tool names, HTTP libraries.
_BOT_WORDS = re.compile(_alternation("""
    crawl spider slurp scraper scrapy scraping fetch archiv indexer indexing monitor uptime pingdom
    statuscake check validat preview scan probe audit analys analyz lighthouse pagespeed headless
    phantomjs slimerjs selenium webdriver puppeteer playwright synthetic diagnostic observatory
    inspector capture screenshot prerender ptst/ gtmetrix transcoder imageproxy proxychecker feed rss
    subscriber parser extractor verif curl wget python aiohttp httpx httpie go-http okhttp java/
    jakarta apache-httpclient libwww lwp- lwp: guzzle axios node-fetch undici http.rb faraday postman
    insomnia k6/ jmeter gatling locust apachebench reqwest zgrab masscan nmap nuclei sqlmap nikto
    facebookexternalhit meta-external embedly google- -google googleother googledocs google_docs
    googleagent google_agent googleproducer googleweb google_web googlefavicon google_favicon
    google_search googlesearch google_page googleads googleimage bingpreview yahoo! cloudflare censys
    netcraft leakix research survey security exporter catchpoint sucker
"""))
# Bot names: "Googlebot", "bingbot", "AhrefsBot", "bot/1.0", but not "CUBOT" (a phone
# brand) or "Caboto": case-sensitive, not after a capital, not before a small letter.
_BOT_NAME = re.compile(r"(?:bot|Bot|BOT)(?<![A-Z]...)(?![a-z])")
# Contact details and templates: browsers never put a URL, a domain or an e-mail
# address in their UA. Case-sensitive so that ".NET CLR" is no domain.
_CONTACT = re.compile(
    r"https?://|www\.|\+http|@[\w-]+\.|\(at\)|\{\{|\$\{"
    r"|\.(?:com|net|org|io|ai|co|de|ru|fr|uk|info|biz|me|app|dev|party|eu|jp|cn|ly)\b"
)

# TVs, set-top boxes, media players, consoles, cars, wearables, XR headsets.
_OTHER_MARKERS = re.compile(
    _alternation("""
        smart-tv smarttv smart_tv hbbtv netcast web0s; webos; webos. tv_safari googletv google_tv androidtv
        android_tv crkey chromecast roku ;_aft bravia appletv apple_tv tvos opera_tv nettv ce-html dlna vidaa
        vizio humax youview _stb ;stb (stb stbapp dunehd kodi/ sonyce bdplayer philipstv viera sraf/
        tv_bro/ tvbro/ (lite)_tv _omi/ tivoos digital-tv _tv_ _tv/ (tv/ dtv_ qtembedded directfb
        playstation (ps3) (ps4) (ps5) xbox nintendo (wii ouya qtcarbrowser tesla/ automotive watchos
        wearos wear_os apple_watch gear_s gear_live gear_fit oculus like_quest piconeo pico_neo picobrowser
        vr_safari hololens magicleap magic_leap ipod
    """)
    + r"|tizen[^;)]*tv|safari/[\d.]+ tv|; mag\d{3}|watch\d|sm-r\d{3}|; quest(?: \d| pro)?\)"
)

# The free-text device model of Android-style UAs ("Android 13; SM-X700 Build/..."):
# model rules look only at this part, and bot words are searched with it blanked out
# (a tablet called "M bot Tab" is no crawler).
_ANDROID_MODEL = re.compile(
    r"(?:Android|Adr|Andr0id)(?: OS)?[ /]?[\d.]*"
    r"(?:;\s*(?:[a-z]{2}(?:[-_][A-Za-z]{4})?[-_][a-zA-Z]{2}|[a-z]{2}|arm(?:_64)?|x86(?:_64)?|U))*;\s*"
    r"(?P<model>[^;)]+?)(?:\s*Build\b[^;)]*)?\s*(?:[;)]|$)",
    re.IGNORECASE,
)
_NOT_A_MODEL = re.compile(r"^(?:k|mobile|tablet|wv|[a-z]{2}(?:[-_][a-z]{4})?(?:[-_][a-z]{2})?)$")

# Tablets whose model code alone says so (vendors' naming schemes). Checked before
# the TV rules: some of these codes look like TV names (Huawei "BTV-W09").
_TABLET_CODE = re.compile(
    r"^(?:samsung[- ])?sm-[tpx]\d|^gt-(?:p\d|n5\d|n8\d)|^sc-0[12]c|^(?:lenovo ?)?tb[-_]?[0-9x]"
    r"|^(?:lenovo ?)?yt\d?-|^lenovo (?:tab|b\d{4})|^nokia t\d\d\b|^nexus (?:7|9|10)\b|^pixel (?:c|tablet)\b"
    # Huawei/Honor MediaPad and MatePad codes; "-W09"-style suffixes are Wi-Fi-only models
    r"|^(?:bah\d?|ags\d?|agr|kob\d?|btv|cmr|scm|mrx|dby\d?|bzw|sht|jdn\d?|krj\d?|hdn|bg2|t1|vrd|cpn|dbr"
    r"|bve|jms|gem|ple)-|^[a-z]{3}\d?-w\d\d\b"
    r"|^rmp\d|^opd\d|^sgp\d|^lg-v[457]\d\d|^(?:asus[_ ])?(?:p0[0-2][0-9a-z]|k0[01][0-9a-z])$|^kf[a-z]{2,6}\b"
    r"|^(?:b1|a1|a3|b3)-[0-9a-z]\d\d|^9\d{3}[a-z]$|^archos ?(?:\w+ )?(?:[7-9]\d|1\d\d)\b|^archos ?5\b"
    r"|^pm[pt]\d|^bq(?:ru)?[-_ ]?(?:7|8|10)\d\d|^tz\d|^mid\b|^mid[-_ ]?\d|^nomi[_ ]c\d"
    r"|^(?:citi|optima|plane|platina)[ _]|^2\d{3}[0-9a-z]rp[0-9a-z]{2,3}$|^element ?\d"
)

# Android TV sets and boxes by model name: "TV"/"LED" in the name, 4K/UHD, DVB-T2
# tuner suffixes, Amazon Fire TV codes, TV-box SoCs, and the panel-size naming scheme
# ("43LU1210", "U50H8000E", "TLE-43FSBM": a series prefix, the screen size in inches,
# letters, then a digit or the end).
_TV_MODEL_CASED = re.compile(
    r"(?<!D)TV(?![A-Za-z])|(?:^|[-_ ])(?:Q|O)?LED[-_ ]?\d|(?<!\d)[48]K\b|\b2K\b|UHD|\dT2(?:[CS]|SM|$)"
    r"|^AFT[A-Z0-9]|^YNDX-|RK33\d\d|(?<![A-Za-z0-9-])S9(?:05|12|22)"
    r"|(?:^|[-_ ])[A-Z]{0,4}[-_ ]?(?:24|28|32|39|40|42|43|48|49|50|55|58|60|65|70|75|77|85|86|98)"
    r"(?:[A-Z]{1,5}(?:_?\d|-\d{3})|[A-Z]{3,5}$)"
)
_TV_MODEL_LOWER = re.compile(
    r"\bbox\b|box$|\bmbox|\bstick\b|dongle|\bott|iptv|\bstb\b|\bshell\b|\bx96|\bh96|\bt95|\ba95x|\bmxq"
    r"|\btx[3-9]\b|ugoos|mecool|vontar|tanix|beelink|gtking|magicsee|zidoo|nexbox|formuler|mibox|mi box"
    r"|vorke|pendoo|minix|neo-x\d|^km\d(?:pro|plus)?\b"
)

# Laptops and desktops running Android apps (Chromebooks via ARC, Android-x86): they
# name a laptop product line, or a Lenovo machine-type code (ThinkPad "20xx......",
# IdeaCentre "F0xx......").
_DESKTOP_MODEL = re.compile(
    r"chromebook|chromebox|pixelbook|inspiron|latitude|vostro|\bxps\b|aspire|travelmate|satellite"
    r"|lifebook|thinkpad|ideapad|thinkcentre|pavilion|elitebook|probook|\benvy\b|macbook|netbook"
    r"|\bremix mini\b|surface (?:pro|book|laptop)|^(?:20|f0)(?:[a-z][a-z0-9]|[0-9][a-z])[a-z0-9]{6}$"
)

# Tablet words and tablet-only brands/product lines in a model name.
_TABLET_MODEL = re.compile(
    r"tab(?!le[^t])|(?<!cool)pad(?!fone)|kindle|transformer|iconia|xoom|\bvenue\b|teclast|chuwi"
    r"|alldocube|\bcube\b|\biplay|headwolf|vankyo|dragon ?touch|\bnabi\b|mytab|\bmediacom\b|smartpad"
    r"|pocketbook|contixo|\bodys|surftab|\bmemo\b|\bmt\d{4}|ainol|yarvik|arnova|\bonda\b|\bpipo\b"
    r"|kurio|irulu|fusion5|kiano|woxter|endeavour|readboy|irbis"
)
_TABLET_UA = re.compile(r"ipad|/apad(?![a-z])|mediapad|pocketbook/|tablet(?! pc)(?![a-z])|playbook|kindle|silk/")

_MOBILE_UA = re.compile(
    r"Mobile|iPhone|MIDP|CLDC|J2ME|UP\.Browser|Opera Mini|Opera Mobi|WAP|KaiOS|BlackBerry|BB10"
    r"|Windows Phone|IEMobile|Windows CE|Symbian|Series ?[46]0|S60(?!\d)|Nokia|NetFront|Obigo|Openwave"
    r"|MAUI|MRE/|wds \d|bada|SAMSUNG-|Samsung-|SonyEricsson|MOT-|LG-|Palm|webOS/|hpwOS"
    r"|Maemo|MeeGo|Sailfish|Firefox OS|UCWEB|dv\(iPh|iPh\d|Xiino|Dalvik|Android|Adr \d|mobile safari"
)
# A browser engine token: "Android without Mobile = tablet" holds for browsers, not
# for apps' own HTTP stacks (Dalvik, UCWEB, WhatsApp, ...).
_BROWSER_ENGINE = re.compile(r"AppleWebKit/|Gecko/|Presto/|Chrome/")

_DESKTOP_UA = re.compile(
    r"Windows NT|Windows (?:9[58x]|98|2000|XP|ME)|Win(?:9[58x]|NT|32|64|16|dows)(?![a-z0-9])"
    r"|win(?:7|8|10|11)(?!\d)|Macintosh|Mac OS X|Mac OS/|Mac_PowerPC|MacBook|iMac|Macmini|MacPro|PowerBook"
    r"|PowerMac|macOS|Darwin/[\d.]+ \((?:x86_64|i386|Power)|X11|CrOS|Ubuntu|Fedora|FreeBSD|OpenBSD"
    r"|NetBSD|SunOS|Solaris|IRIX|AIX(?![A-Za-z])|OS/2|Haiku|BeOS|AmigaOS|MorphOS|RISC OS|Desktop|Wayland"
    r"|textmode|os=(?:Mac|Windows)|2in1|Linux|CFNetwork/.*Mac"
)

_MOBILE_DEVICE_FAMILIES = frozenset(("iPhone", "iOS-Device", "Generic Smartphone"))
_MOBILE_OS_FAMILIES = frozenset((
    "iOS", "Android", "Windows Phone", "Windows Mobile", "BlackBerry OS", "Symbian OS", "Symbian^3",
    "KaiOS", "Firefox OS", "Tizen", "Bada", "Maemo", "MeeGo", "webOS", "Sailfish", "Series 40", "Series 60",
))


def _android_model(ua: str) -> str | None:
    m = _ANDROID_MODEL.search(ua)
    if m is None:
        return None
    model = m.group("model").strip().lstrip("(")
    # "K" is Chrome's reduced-UA placeholder; locales and generic words are no models.
    if not model or _NOT_A_MODEL.match(model.lower()):
        return None
    return model


def _classify(ua: str, p: UserAgent) -> str:
    low = ua.lower()
    model = _android_model(ua)
    model_low = model.lower() if model else ""

    # 1. bots: they often copy a browser's UA and append their name, so they go first.
    if p.device.family == "Spider" or _CONTACT.search(ua):
        return "bot"
    text = ua.replace(model, " ") if model else ua
    if _BOT_NAME.search(text) or _BOT_WORDS.search(text.lower() if model else low):
        return "bot"

    # 2. tablets known by model code; then TVs, boxes, consoles, cars, wearables, XR
    if model and _TABLET_CODE.search(model_low):
        return "tablet"
    if _OTHER_MARKERS.search(low) or p.device.brand == "Generic_Inettv":
        return "other"
    if model and (_TV_MODEL_CASED.search(model) or _TV_MODEL_LOWER.search(model_low)):
        return "other"

    # 3. laptops and Chromebooks running Android (apps)
    if model and _DESKTOP_MODEL.search(model_low) or "CrosArc" in ua:
        return "desktop"

    # 4. tablets
    if _TABLET_UA.search(low) or (model and _TABLET_MODEL.search(model_low)):
        return "tablet"
    if p.device.family in TABLET_DEVICE_FAMILIES:
        return "tablet"
    if (model or p.os.family == "Android") and "Mobile" not in ua and _BROWSER_ENGINE.search(ua):
        # Android browsers leave "Mobile" out on tablets (Chrome, the stock browser).
        return "tablet"
    if p.os.family == "Windows" and p.os.version_string.startswith("RT"):
        return "tablet"

    # 5. phones
    if _MOBILE_UA.search(ua) or p.device.family in _MOBILE_DEVICE_FAMILIES:
        return "mobile"
    desktop = _DESKTOP_UA.search(ua)
    if p.os.family in _MOBILE_OS_FAMILIES and not desktop:
        return "mobile"

    # 6. desktops
    if desktop or p.is_pc:
        return "desktop"

    # 7. ua-parser knows the OS or device, yet no rule placed it: some unusual kind of
    # device. A string naming no platform at all is an automated client.
    if p.os.family != "Other" or p.device.family not in ("Other", "Generic Feature Phone"):
        return "other"
    return "bot"


_GENERIC_MODELS = frozenset(("K", "Smartphone", "Feature Phone", "Tablet", "Desktop"))


def _details(p: UserAgent) -> dict[str, dict[str, str]] | None:
    out: dict[str, dict[str, str]] = {}
    for key, part in (("browser", p.browser), ("os", p.os)):
        if part.family and part.family != "Other":
            info = {"family": part.family}
            if part.version_string:
                info["version"] = part.version_string
            out[key] = info
    if p.device.model == "K" and "os" in out:
        # Chrome's reduced UA ("Android 10; K") always says Android 10: not the real version.
        out["os"].pop("version", None)
    d = p.device
    if d.brand != "Spider":
        dev = {}
        if d.brand and not d.brand.startswith("Generic"):
            dev["brand"] = d.brand
        if d.model and d.model not in _GENERIC_MODELS:
            dev["model"] = d.model
        if dev:
            out["device"] = dev
    return out or None


# ---------------------------------------------------------------------------
# Client hints (Sec-CH-UA-*): structured-header strings such as '?1', '"Android"',
# '"Chromium";v="124", "Google Chrome";v="124"'.

_HINT_KEYS = (
    "sec-ch-ua-mobile",
    "sec-ch-ua-platform",
    "sec-ch-ua-platform-version",
    "sec-ch-ua-model",
    "sec-ch-ua-form-factors",
    "sec-ch-ua-full-version-list",
    "sec-ch-ua",
)
_BRAND_RE = re.compile(r'"([^"]*)"\s*;\s*v\s*=\s*"([^"]*)"')
_QUOTED_RE = re.compile(r'"([^"]*)"')
# Hint brand -> ua-parser family, where they differ.
_BRAND_FAMILIES = {
    "Google Chrome": "Chrome",
    "Microsoft Edge": "Edge",
    "YaBrowser": "Yandex Browser",
    "Yandex": "Yandex Browser",
}
_PLATFORMS = {
    "android": "Android",
    "windows": "Windows",
    "macos": "Mac OS X",
    "ios": "iOS",
    "chrome os": "Chrome OS",
    "chromium os": "Chrome OS",
    "linux": "Linux",
}


def _unquote(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    return value.strip().strip('"').strip() or None


def _hints_key(hints: Mapping[str, Any]) -> tuple[str | None, ...] | None:
    """The hints that matter, as a hashable cache key (None when there are none)."""
    key = tuple(v if isinstance(v := hints.get(k), str) and len(v) <= 512 else None for k in _HINT_KEYS)
    return key if any(key) else None


def _platform_version(platform: str, raw: str) -> str | None:
    if platform == "Windows":
        # Chrome reports Windows' UniversalApiContract major version: 13+ is Windows
        # 11, 1-10 is Windows 10, 0 is 7/8/8.1 (whose UA says "Windows NT" 6.x anyway).
        try:
            major = int(raw.split(".", 1)[0])
        except ValueError:
            return None
        return "11" if major >= 13 else "10" if major >= 1 else None
    parts = raw.split(".")
    while len(parts) > 1 and parts[-1] in ("0", ""):
        parts.pop()  # "14.0.0" -> "14"
    return ".".join(parts) if parts[0].isdigit() else None


def _refine(base: Device, key: tuple[str | None, ...], model_brand: str | None) -> Device:
    """Apply client hints to a UA-only result (Chrome's reduced UA hides model and OS version)."""
    mobile, platform, platform_version, model, form_factors, full_list, brands = key
    device_type = base.device_type
    details = {k: dict(v) for k, v in (base.details or {}).items()}

    brand_list = _BRAND_RE.findall(full_list or "") or _BRAND_RE.findall(brands or "")
    if any(name == "HeadlessChrome" for name, _ in brand_list):
        device_type = "bot"
    platform_name = _PLATFORMS.get((_unquote(platform) or "").lower())
    model_name = _unquote(model)

    if device_type not in ("bot", "other"):
        factors = {f.strip().lower() for f in _QUOTED_RE.findall(form_factors or "")}
        if factors & {"xr", "watch", "automotive"}:
            device_type = "other"
        elif "mobile" in factors:
            device_type = "mobile"
        elif factors & {"tablet", "eink"}:
            device_type = "tablet"
        elif "desktop" in factors:
            device_type = "desktop"
        elif mobile == "?1":
            device_type = "mobile"
        elif mobile == "?0" and platform_name == "Android":
            # A non-mobile Android browser: a tablet, unless its model says TV or laptop.
            device_type = "tablet"
            if model_name and (_TV_MODEL_CASED.search(model_name) or _TV_MODEL_LOWER.search(model_name.lower())):
                device_type = "other"
            elif model_name and _DESKTOP_MODEL.search(model_name.lower()):
                device_type = "desktop"
        elif mobile == "?0" and platform_name in ("Windows", "Mac OS X", "Chrome OS", "Linux"):
            device_type = "desktop"
        if device_type == "mobile" and model_name and _TABLET_CODE.search(model_name.lower()):
            device_type = "tablet"  # tablets in Chrome's "request mobile site" mode

    # The platform hint wins over the UA, except "Linux" (whose version is the kernel's)
    # over whatever the UA names ("Ubuntu", "Linux").
    if platform_name and not (platform_name == "Linux" and "os" in details):
        os_info = details.get("os", {})
        if os_info.get("family") != platform_name:
            os_info = {"family": platform_name}
        raw_version = _unquote(platform_version)
        version = _platform_version(platform_name, raw_version) if raw_version else None
        if version:
            os_info["version"] = version
        details["os"] = os_info

    if model_name:
        details["device"] = {"brand": model_brand, "model": model_name} if model_brand else {"model": model_name}

    real = [(n, v) for n, v in brand_list if not ("Not" in n and "Brand" in n) and n != "Chromium"]
    if real:
        browser = details.get("browser", {})
        family = browser.get("family", "")
        for name, version in real:
            mapped = _BRAND_FAMILIES.get(name, name)
            if family == mapped or family.startswith(mapped + " "):
                if full_list:
                    browser["version"] = version  # the full version the reduced UA hides
                break
        else:
            # The UA looks like plain Chrome but the hints name another brand (Brave...).
            if not family or family in ("Chrome", "Chrome Mobile", "Chromium"):
                name, version = real[0]
                browser = {"family": _BRAND_FAMILIES.get(name, name), "version": version}
        if browser:
            details["browser"] = browser

    return Device(device_type, details or None)


# ---------------------------------------------------------------------------


# A phone-browser UA around a bare model name: ua-parser's vendor rules expect this shape.
_MODEL_PROBE = (
    "Mozilla/5.0 (Linux; Android 10; {} Build/X) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0.0.0 Mobile Safari/537.36"
)


class DeviceDetector:
    """Device detection with two LRU caches of ``cache_size`` entries each: one per
    User-Agent, one per (User-Agent, client hints). ``cache_size=0`` disables caching."""

    def __init__(self, cache_size: int = 10_000) -> None:
        if not isinstance(cache_size, int) or cache_size < 0:
            raise ValueError(f"cache_size must be an int >= 0, not {cache_size!r}")
        self.cache_size = cache_size
        self._parse = functools.lru_cache(maxsize=cache_size)(self._parse_uncached)
        self._with_hints = functools.lru_cache(maxsize=cache_size)(self._with_hints_uncached)

    @staticmethod
    def _parse_uncached(ua: str) -> Device:
        try:
            p = user_agents.parse(ua)
            return Device(_classify(ua, p), _details(p))
        except Exception:  # noqa: BLE001 - a parser bug on odd input must not stop the worker
            return NO_DEVICE

    def _with_hints_uncached(self, ua: str, key: tuple[str | None, ...]) -> Device:
        base = self._parse(ua)
        if base.device_type is None:
            return base
        model_brand = None
        model = _unquote(key[3])
        if model:
            # ua-parser knows brands by model code; ask it about the model alone.
            try:
                brand = user_agent_parser.ParseDevice(_MODEL_PROBE.format(model))["brand"]
                if brand and not brand.startswith("Generic"):
                    model_brand = brand
            except Exception:  # noqa: BLE001
                pass
        try:
            return _refine(base, key, model_brand)
        except Exception:  # noqa: BLE001 - malformed hints: the UA's answer stands
            return base

    def detect(self, user_agent: str | None, hints: Mapping[str, Any] | None = None) -> Device:
        if not isinstance(user_agent, str):
            return NO_DEVICE
        ua = user_agent.strip()
        if not ua:
            return NO_DEVICE
        if len(ua) > MAX_UA_LENGTH:
            ua = ua[:MAX_UA_LENGTH]
        if hints:
            try:
                key = _hints_key(hints)
            except Exception:  # noqa: BLE001 - hints is not a mapping
                key = None
            if key is not None:
                return self._with_hints(ua, key)
        return self._parse(ua)

    __call__ = detect

    def cache_info(self):
        """``functools`` statistics of the per-User-Agent cache."""
        return self._parse.cache_info()

    def cache_clear(self) -> None:
        self._parse.cache_clear()
        self._with_hints.cache_clear()


_default: DeviceDetector | None = None
_default_lock = threading.Lock()


def detect(user_agent: str | None, hints: Mapping[str, Any] | None = None) -> Device:
    """Detect with a process-wide ``DeviceDetector()`` (cache size 10,000). A worker
    that honours ``EnrichSettings.ua_cache_size`` builds its own detector."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = DeviceDetector()
    return _default.detect(user_agent, hints)
