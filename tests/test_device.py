"""Device detection: classes, details, client hints, caching, accuracy floor."""

from __future__ import annotations

import collections

import pytest

from pipeline.settings import PROJECT_ROOT, EnrichSettings
from processors.device import DEVICE_TYPES, NO_DEVICE, Device, DeviceDetector, detect

UA_FILE = PROJECT_ROOT.parent / "shared" / "ua" / "device-types.tsv"

CHROME_WIN = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0.0.0 Safari/537.36"
)
REDUCED_ANDROID_PHONE = (
    "Mozilla/5.0 (Linux; Android 10; K) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0.0.0 Mobile Safari/537.36"
)
REDUCED_ANDROID_TABLET = REDUCED_ANDROID_PHONE.replace("Mobile Safari", "Safari")

EXAMPLES = {
    "desktop": [
        CHROME_WIN,
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:125.0) Gecko/20100101 Firefox/125.0",
        "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:124.0) Gecko/20100101 Firefox/124.0",
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
        "Version/17.4 Safari/605.1.15",
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/124.0.0.0 Safari/537.36 Edg/124.0.2478.80",
        "Mozilla/5.0 (X11; CrOS x86_64 14541.0.0) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/124.0.0.0 Safari/537.36",
        "Mozilla/5.0 (Windows NT 6.1; WOW64; Trident/7.0; rv:11.0) like Gecko",
        # a Chromebook running the Android app of a browser
        "Mozilla/5.0 (Linux; Android 9; Acer Chromebook 15 (CB3-532)) AppleWebKit/537.36 "
        "(KHTML, like Gecko) Chrome/83.0.4103.106 Safari/537.36",
    ],
    "mobile": [
        "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
        "Version/17.4 Mobile/15E148 Safari/604.1",
        "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
        "CriOS/124.0.6367.88 Mobile/15E148 Safari/604.1",
        "Mozilla/5.0 (Linux; Android 14; SM-S918B) AppleWebKit/537.36 (KHTML, like Gecko) "
        "SamsungBrowser/24.0 Chrome/117.0.0.0 Mobile Safari/537.36",
        "Mozilla/5.0 (Linux; Android 13; Pixel 7 Build/TQ3A.230805.001; wv) AppleWebKit/537.36 "
        "(KHTML, like Gecko) Version/4.0 Chrome/116.0.0.0 Mobile Safari/537.36",
        REDUCED_ANDROID_PHONE,
        "Mozilla/5.0 (Android 14; Mobile; rv:125.0) Gecko/125.0 Firefox/125.0",
        "Dalvik/2.1.0 (Linux; U; Android 10; Pixel 4a Build/QD4A.200805.003)",
        "Opera/9.80 (J2ME/MIDP; Opera Mini/4.2.14912/870; U; id) Presto/2.4.15",
        "Mozilla/5.0 (Mobile; rv:48.0; A405DL) Gecko/48.0 Firefox/48.0 KAIOS/2.5",
        # "CUBOT" is a phone brand, not a bot
        "Mozilla/5.0 (Linux; Android 10; CUBOT X30) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/120.0.0.0 Mobile Safari/537.36",
    ],
    "tablet": [
        "Mozilla/5.0 (iPad; CPU OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
        "Version/17.4 Mobile/15E148 Safari/604.1",
        "Mozilla/5.0 (Linux; Android 13; SM-X700) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/124.0.0.0 Safari/537.36",
        REDUCED_ANDROID_TABLET,
        "Mozilla/5.0 (Android 14; Tablet; rv:125.0) Gecko/125.0 Firefox/125.0",
        "Mozilla/5.0 (Linux; Android 11; KFTRWI) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Silk/123.2.1 like Chrome/123.0.6312.118 Safari/537.36",
        # tablets whose browser still says "Mobile": known by their model codes
        "Mozilla/5.0 (Linux; Android 11; TB-X306X) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/91.0.4472.101 Mobile Safari/537.36",
        "Mozilla/5.0 (Linux; Android 11; SM-T738T) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/88.0.4324.150 Mobile Safari/537.36",
        "Mozilla/5.0 (Linux; Android 9; VRD-W09 Build/HUAWEIVRD-W09) AppleWebKit/537.36 "
        "(KHTML, like Gecko) Version/4.0 Chrome/70.0.3538.64 Mobile Safari/537.36",
    ],
    "bot": [
        "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
        "Mozilla/5.0 (Linux; Android 6.0.1; Nexus 5X Build/MMB29P) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/124.0.6367.78 Mobile Safari/537.36 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
        "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)",
        "curl/8.4.0",
        "python-requests/2.31.0",
        "Go-http-client/1.1",
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "HeadlessChrome/124.0.0.0 Safari/537.36",
        "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; GPTBot/1.0; +https://openai.com/gptbot)",
        "facebookexternalhit/1.1 (+http://www.facebook.com/externalhit_uatext.php)",
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/120.0.0.0 Safari/537.36 Lighthouse",
        "NodePing",  # names no platform at all
    ],
    "other": [
        "Mozilla/5.0 (SMART-TV; Linux; Tizen 6.0) AppleWebKit/537.36 (KHTML, like Gecko) "
        "SamsungBrowser/4.0 Chrome/76.0.3809.146 TV Safari/537.36",
        "Mozilla/5.0 (Web0S; Linux/SmartTV) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/87.0.4280.88 "
        "Safari/537.36 WebAppManager",
        "Mozilla/5.0 (PlayStation; PlayStation 5/2.26) AppleWebKit/605.1.15 (KHTML, like Gecko) "
        "Version/13.0 Safari/605.1.15",
        "Mozilla/5.0 (PlayStation 4 11.00) AppleWebKit/605.1.15 (KHTML, like Gecko)",
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64; Xbox; Xbox One) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/70.0.3538.102 Safari/537.36 Edge/18.19041",
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64; Xbox; Xbox Series X) AppleWebKit/537.36 "
        "(KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36 Edg/120.0.0.0",
        "AppleCoreMedia/1.0.0.20K71 (Apple TV; U; CPU OS 16_1 like Mac OS X; en_us)",
        "AppleTV11,1/11.1",
        "Mozilla/5.0 (Linux; Android 9; AFTMM Build/PS7233; wv) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Version/4.0 Chrome/108.0.5359.160 Mobile Safari/537.36",
        "Mozilla/5.0 (X11; Linux armv7l) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/96.0.4664.110 "
        "Safari/537.36 CrKey/1.56.500000",
        "Roku/DVP-9.10 (519.10E04111A)",
        "Mozilla/5.0 (Nintendo Switch; WifiWebAuthApplet) AppleWebKit/606.4 (KHTML, like Gecko) "
        "NF/6.0.1.15.4 NintendoBrowser/5.1.0.20393",
        # Android TV sets by model name: screen size in the name, "LED", DVB-T2 tuner
        "Mozilla/5.0 (Linux; Android 11; 43LU1210 Build/RP1A.200720.011; wv) AppleWebKit/537.36 "
        "(KHTML, like Gecko) Version/4.0 Chrome/113.0.5672.163 Safari/537.36",
        "Mozilla/5.0 (Linux; arm; Android 9; H-LED75BU7005 Build/PPR2.180905.006.A1; wv) AppleWebKit/537.36 "
        "(KHTML, like Gecko) Version/4.0 Chrome/104.0.5112.102 Mobile Safari/537.36",
        # cars, wearables, XR headsets
        "Mozilla/5.0 (X11; Linux) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/79.0.3945.130 "
        "Safari/537.36 Tesla/2023.44.30",
        "Mozilla/5.0 (Linux; Tizen 5.5; SAMSUNG SM-R820) AppleWebKit/537.36 (KHTML, like Gecko) "
        "SamsungBrowser/1.0 Chrome/69.0.3497.106 Mobile Safari/537.36",
        "Mozilla/5.0 (Linux; Android 10; Quest 2) AppleWebKit/537.36 (KHTML, like Gecko) "
        "OculusBrowser/26.0.0.8.40 SamsungBrowser/4.0 Chrome/110.0.5481.222 VR Safari/537.36",
    ],
}


@pytest.fixture
def detector() -> DeviceDetector:
    return DeviceDetector(cache_size=100)


@pytest.mark.parametrize(
    "expected, ua", [(kind, ua) for kind, uas in EXAMPLES.items() for ua in uas]
)
def test_device_classes(detector, expected, ua):
    assert detector.detect(ua).device_type == expected


@pytest.mark.parametrize("ua", [None, "", "   ", 42, b"curl/8.4.0", ["x"]])
def test_missing_or_garbage_input_gives_nulls(detector, ua):
    assert detector.detect(ua) == Device(None, None)
    assert detector.detect(ua, {"sec-ch-ua-mobile": "?1"}) is NO_DEVICE


def test_huge_input_is_cut_and_classified(detector):
    assert detector.detect("x" * 100_000).device_type == "bot"
    assert detector.detect(CHROME_WIN + " " + "a" * 100_000).device_type == "desktop"


def test_details_hold_known_values_only(detector):
    iphone = detector.detect(EXAMPLES["mobile"][0]).details
    assert iphone == {
        "browser": {"family": "Mobile Safari", "version": "17.4"},
        "os": {"family": "iOS", "version": "17.4"},
        "device": {"brand": "Apple", "model": "iPhone"},
    }
    samsung = detector.detect(EXAMPLES["mobile"][2]).details
    assert samsung["device"] == {"brand": "Samsung", "model": "SM-S918B"}
    assert samsung["os"] == {"family": "Android", "version": "14"}
    assert detector.detect(CHROME_WIN).details == {
        "browser": {"family": "Chrome", "version": "124.0.0"},
        "os": {"family": "Windows", "version": "10"},
    }
    # bots: the bot's name, no made-up device
    assert detector.detect(EXAMPLES["bot"][0]).details == {"browser": {"family": "Googlebot", "version": "2.1"}}
    assert detector.detect("curl/8.4.0").details == {"browser": {"family": "curl", "version": "8.4.0"}}
    assert detector.detect("NodePing").details is None


def test_reduced_ua_hides_android_version_and_model(detector):
    details = detector.detect(REDUCED_ANDROID_PHONE).details
    assert details == {"browser": {"family": "Chrome Mobile", "version": "124.0.0"}, "os": {"family": "Android"}}


# --- client hints ---------------------------------------------------------------

PHONE_HINTS = {
    "sec-ch-ua": '"Chromium";v="124", "Google Chrome";v="124", "Not-A.Brand";v="99"',
    "sec-ch-ua-mobile": "?1",
    "sec-ch-ua-platform": '"Android"',
    "sec-ch-ua-platform-version": '"14.0.0"',
    "sec-ch-ua-model": '"SM-S918B"',
    "sec-ch-ua-full-version-list": '"Chromium";v="124.0.6367.82", "Google Chrome";v="124.0.6367.82", '
    '"Not-A.Brand";v="99.0.0.0"',
}


def test_hints_restore_what_the_reduced_ua_hides(detector):
    result = detector.detect(REDUCED_ANDROID_PHONE, PHONE_HINTS)
    assert result == Device(
        "mobile",
        {
            "browser": {"family": "Chrome Mobile", "version": "124.0.6367.82"},
            "os": {"family": "Android", "version": "14"},
            "device": {"brand": "Samsung", "model": "SM-S918B"},
        },
    )


def test_hints_non_mobile_android_is_a_tablet(detector):
    hints = {"sec-ch-ua-mobile": "?0", "sec-ch-ua-platform": '"Android"', "sec-ch-ua-model": '"SM-X700"'}
    result = detector.detect(REDUCED_ANDROID_PHONE, hints)
    assert result.device_type == "tablet"
    assert result.details["device"] == {"brand": "Samsung", "model": "SM-X700"}


def test_hints_mobile_flag_makes_a_phone(detector):
    result = detector.detect(REDUCED_ANDROID_TABLET, {"sec-ch-ua-mobile": "?1", "sec-ch-ua-platform": '"Android"'})
    assert result.device_type == "mobile"


def test_hints_tablet_model_in_mobile_mode_stays_a_tablet(detector):
    hints = {"sec-ch-ua-mobile": "?1", "sec-ch-ua-platform": '"Android"', "sec-ch-ua-model": '"SM-X700"'}
    assert detector.detect(REDUCED_ANDROID_PHONE, hints).device_type == "tablet"


def test_hints_android_tv_model(detector):
    hints = {"sec-ch-ua-mobile": "?0", "sec-ch-ua-platform": '"Android"', "sec-ch-ua-model": '"BRAVIA 4K VH2"'}
    assert detector.detect(REDUCED_ANDROID_TABLET, hints).device_type == "other"


@pytest.mark.parametrize(
    "form_factors, expected",
    [('"Tablet"', "tablet"), ('"Mobile"', "mobile"), ('"XR"', "other"), ('"Desktop"', "desktop"),
     ('"Automotive"', "other"), ('"Watch"', "other")],
)
def test_hints_form_factors(detector, form_factors, expected):
    assert detector.detect(REDUCED_ANDROID_TABLET, {"sec-ch-ua-form-factors": form_factors}).device_type == expected


def test_hints_windows_11_and_macos_version(detector):
    win = detector.detect(CHROME_WIN, {"sec-ch-ua-platform": '"Windows"', "sec-ch-ua-platform-version": '"15.0.0"'})
    assert win.details["os"] == {"family": "Windows", "version": "11"}
    win10 = detector.detect(CHROME_WIN, {"sec-ch-ua-platform": '"Windows"', "sec-ch-ua-platform-version": '"10.0.0"'})
    assert win10.details["os"] == {"family": "Windows", "version": "10"}
    mac_ua = CHROME_WIN.replace("Windows NT 10.0; Win64; x64", "Macintosh; Intel Mac OS X 10_15_7")
    mac = detector.detect(mac_ua, {"sec-ch-ua-platform": '"macOS"', "sec-ch-ua-platform-version": '"14.4.1"'})
    assert mac.details["os"] == {"family": "Mac OS X", "version": "14.4.1"}
    assert mac.device_type == "desktop"


def test_hints_linux_platform_keeps_the_distribution(detector):
    ubuntu = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:124.0) Gecko/20100101 Firefox/124.0"
    hints = {"sec-ch-ua-platform": '"Linux"', "sec-ch-ua-platform-version": '"6.5.0"'}
    assert detector.detect(ubuntu, hints).details["os"] == {"family": "Ubuntu"}


def test_hints_name_the_browser_the_ua_hides(detector):
    brave = detector.detect(CHROME_WIN, {"sec-ch-ua": '"Brave";v="124", "Chromium";v="124", "Not-A.Brand";v="99"'})
    assert brave.details["browser"] == {"family": "Brave", "version": "124"}
    chrome = detector.detect(CHROME_WIN, {"sec-ch-ua": PHONE_HINTS["sec-ch-ua"]})
    assert chrome.details["browser"] == {"family": "Chrome", "version": "124.0.0"}


def test_hints_headless_brand_is_a_bot(detector):
    assert detector.detect(CHROME_WIN, {"sec-ch-ua": '"HeadlessChrome";v="124"'}).device_type == "bot"


def test_hints_do_not_turn_bots_or_tvs_into_browsers(detector):
    assert detector.detect(EXAMPLES["bot"][1], PHONE_HINTS).device_type == "bot"
    assert detector.detect(EXAMPLES["other"][0], {"sec-ch-ua-mobile": "?0"}).device_type == "other"


@pytest.mark.parametrize(
    "hints",
    [{}, None, "garbage", 42, ["sec-ch-ua-mobile"], {"sec-ch-ua-mobile": 1}, {"unrelated": "x"},
     {"sec-ch-ua-model": '"'}, {"sec-ch-ua-platform-version": '"x.y"', "sec-ch-ua-platform": '"Android"'},
     {"sec-ch-ua": "not a structured header"}],
)
def test_unusable_hints_leave_the_ua_answer(detector, hints):
    base = detector.detect(REDUCED_ANDROID_TABLET)
    result = detector.detect(REDUCED_ANDROID_TABLET, hints)
    assert result.device_type == base.device_type == "tablet"


# --- caching --------------------------------------------------------------------


def test_cache_hits_and_eviction():
    detector = DeviceDetector(cache_size=2)
    first = detector.detect(CHROME_WIN)
    assert detector.detect(CHROME_WIN) is first
    assert detector.cache_info().hits == 1
    detector.detect(REDUCED_ANDROID_PHONE)
    detector.detect(REDUCED_ANDROID_TABLET)  # evicts CHROME_WIN
    assert detector.cache_info().currsize == 2
    assert detector.detect(CHROME_WIN) == first
    assert detector.cache_info().misses == 4


def test_hinted_results_are_cached_per_ua_and_hints():
    detector = DeviceDetector(cache_size=10)
    a = detector.detect(REDUCED_ANDROID_PHONE, PHONE_HINTS)
    assert detector.detect(REDUCED_ANDROID_PHONE, dict(PHONE_HINTS)) is a
    other_model = dict(PHONE_HINTS, **{"sec-ch-ua-model": '"Pixel 8"'})
    assert detector.detect(REDUCED_ANDROID_PHONE, other_model).details["device"]["model"] == "Pixel 8"
    # the UA-only result is cached once and shared by both hinted results
    assert detector.cache_info().currsize == 1


def test_cache_size_zero_disables_caching():
    detector = DeviceDetector(cache_size=0)
    assert detector.detect(CHROME_WIN) == detector.detect(CHROME_WIN)
    assert detector.cache_info().currsize == 0


def test_cache_size_from_settings_and_validation():
    detector = DeviceDetector(EnrichSettings().ua_cache_size)
    assert detector.cache_info().maxsize == EnrichSettings().ua_cache_size
    with pytest.raises(ValueError):
        DeviceDetector(-1)


def test_module_level_detect():
    assert detect(CHROME_WIN).device_type == "desktop"
    assert detect(None) is NO_DEVICE


# --- accuracy on the labelled sample --------------------------------------------

# Measured 95.7% overall; per-class recall desktop 97.3, mobile 98.8, tablet 91.2,
# bot 99.0, other 87.0 (benchmarks/device.py). Floors sit ~1.5-3 points below.
ACCURACY_FLOOR = 0.94
RECALL_FLOORS = {"desktop": 0.95, "mobile": 0.97, "tablet": 0.89, "bot": 0.97, "other": 0.84}


def test_accuracy_on_labelled_user_agents():
    rows = []
    with UA_FILE.open(encoding="utf-8") as f:
        assert f.readline().rstrip("\n") == "user_agent\tdevice_type"
        for line in f:
            ua, _, label = line.rstrip("\n").rpartition("\t")
            rows.append((ua, label))
    assert {label for _, label in rows} == set(DEVICE_TYPES)

    detector = DeviceDetector(cache_size=0)
    hits = collections.Counter()
    totals = collections.Counter()
    for ua, label in rows:
        totals[label] += 1
        hits[label] += detector.detect(ua).device_type == label
    accuracy = sum(hits.values()) / len(rows)
    recall = {label: hits[label] / totals[label] for label in totals}
    assert accuracy >= ACCURACY_FLOOR, (accuracy, recall)
    for label, floor in RECALL_FLOORS.items():
        assert recall[label] >= floor, (label, recall[label])
