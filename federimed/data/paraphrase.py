"""Phrase-level paraphrase of the catalogue's findings, so that a finding is never one fixed
string: each rule matches a wording of :mod:`federimed.data.conditions` and gives the formal,
shorthand and lay wordings a note may use instead (:mod:`federimed.data.synth` picks one per
note, by the writer's style and habits)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from itertools import product


@dataclass(frozen=True)
class Paraphrase:
    """One wording rule: a regex (named groups allowed) and the wordings a match may take.

    ``formal[0]`` rebuilds the catalogue's own wording; ``formal`` suits any note, ``short``
    shorthand and abbreviations, ``lay`` the patient's words.  Templates name the pattern's
    groups (``{x}``; ``{x_and}`` joins a list of words with commas and "and"), and a group's
    text is itself paraphrased.
    """

    pattern: str
    formal: tuple[str, ...]
    short: tuple[str, ...] = ()
    lay: tuple[str, ...] = ()


def _p(
    canonical: str,
    formal: Sequence[str] = (),
    short: Sequence[str] = (),
    lay: Sequence[str] = (),
    pattern: str | None = None,
) -> Paraphrase:
    return Paraphrase(pattern or re.escape(canonical), (canonical, *formal), (*short,), (*lay,))


_BODY = r"(?:(?:left|right) )?(?:calf|big toe|thigh|knee|foot|leg|first MTP joint|ankle)"

# fmt: off
PARAPHRASES: tuple[Paraphrase, ...] = (
    # onset, course, severity and hedges (word order changes included)
    _p("sudden onset {x}", ("abrupt onset {x}", "{x} of sudden onset"), (), ("{x} that came on suddenly",), r"sudden onset (?P<x>.+)"),  # noqa: E501
    _p("sudden {x}", ("abrupt-onset {x}", "{x} of sudden onset", "sudden-onset {x}"), ("sudden onset {x}",), ("{x} that came on suddenly",), r"sudden (?P<x>.+)"),  # noqa: E501
    _p("severe {x}", ("intense {x}", "{x}, severe"), ("{x} 9/10", "{x} 10/10", "sev {x}"), ("really bad {x}",), r"severe (?P<x>(?:[\w-]+ )*?(?:pain|headache))"),  # noqa: E501
    _p("severe weakness", ("profound weakness", "marked weakness"), (), ("too weak to stand",)),
    _p("mild {x}", ("slight {x}",), ("mild {x}",), (), r"mild (?P<x>jaundice|diffuse tenderness)"),
    _p("worsening {x}", ("increasing {x}", "progressive {x}"), ("↑ {x}", "worse {x}"), ("{x} getting worse",), r"worsening (?P<x>.+)"),  # noqa: E501
    _p("increased {x}", ("more {x}",), ("↑ {x}", "↑{x}"), ("more {x}",), r"increased (?P<x>.+)"),
    _p("progressive {x}", ("gradually worsening {x}",), ("progressive {x}",), ("{x} getting worse",), r"progressive (?P<x>leg weakness)"),  # noqa: E501
    _p("rapidly spreading {x}", ("fast-spreading {x}", "{x} spreading rapidly"), (), ("{x} spreading fast",), r"rapidly spreading (?P<x>.+)"),  # noqa: E501
    _p("worse on inspiration", ("worse on deep breathing",), ("↑ on inspiration",), ("worse when breathing in",)),  # noqa: E501
    _p("worse {p} {x}", ("aggravated by {x}", "exacerbated by {x}"), ("↑ {p} {x}",), (), r"worse (?P<p>on|with) (?P<x>.+)"),  # noqa: E501
    _p("eased by {x}", ("relieved by {x}", "improved by {x}"), ("better {x}",), ("better {x}",), r"eased by (?P<x>.+)"),  # noqa: E501
    _p("radiating {p} {x}", ("radiating into {x}", "spreading to {x}", "going to {x}"), ("rad. to {x}", "→ {x}", "radiating to {x}"), ("going into {x}",), r"radiating (?P<p>to|through to) (?P<x>.+)"),  # noqa: E501
    _p("{adjs}{x}", (), ("{x} {adjs_and}",), (), rf"(?P<adjs>(?:(?:painful|swollen|tender|red|hot|warm) ){{2,3}})(?P<x>{_BODY})"),  # noqa: E501
    _p("{n} of the {x}", ("{x} {n}",), ("{x} {n}",), (), r"(?P<n>numbness|redness|warmth) of the (?P<x>(?:(?:left|right) )?(?:arm|leg|calf))"),  # noqa: E501
    _p("recent {x}", ("{x} recently",), ("recent {x}",), (), r"recent (?P<x>.+)"),
    _p("recently {v} {x}", ("{v} {x} recently",), ("{v} {x}",), (), r"recently (?P<v>stopped|started) (?P<x>.+)"),  # noqa: E501
    _p("previous {x}", ("prior {x}",), ("prev {x}", "h/o {x}"), ("{x} in the past",), r"previous (?P<x>.+)"),  # noqa: E501
    _p("similar previous {x}", ("similar {x} before", "previous similar {x}"), ("similar {x} previously",), (), r"similar previous (?P<x>.+)"),  # noqa: E501
    _p("known {x}", ("background of {x}",), ("known {x}", "k/c/o {x}"), (), r"known (?P<x>.+)"),
    _p("family history of {x}", ("{x} in the family",), ("FHx {x}", "FH of {x}"), ("{x} in the family",), r"family history of (?P<x>.+)"),  # noqa: E501
    _p("unable to {x}", ("cannot {x}",), ("can't {x}",), ("can't {x}",), r"unable to (?P<x>.+)"),
    _p("difficulty {x}", ("trouble {x}",), ("diff {x}",), ("struggling with {x}",), r"difficulty (?P<x>walking|finding words|climbing stairs)"),  # noqa: E501
    _p("reduced {x}", ("decreased {x}", "diminished {x}"), ("↓ {x}", "↓{x}"), (), r"reduced (?P<x>exercise tolerance|breath sounds|air entry|chest expansion|bowel sounds|skin turgor|visual acuity)"),  # noqa: E501
    _p("raised {x}", ("elevated {x}",), ("↑{x}", "{x} ↑"), (), r"raised (?P<x>PaCO2|protein)"),
    _p("positive {x} sign", ("{x} sign positive",), ("{x} +ve", "+ve {x}"), (), r"positive (?P<x>[\w']+) sign"),  # noqa: E501
    _p("positive", (), ("+ve", "pos")),
    _p("negative", (), ("-ve", "neg")),
    _p("bilateral", (), ("bilat", "B/L")),
    _p("bilaterally", ("on both sides",), ("bilat",)),
    _p("left-sided", (), ("L-sided", "L sided")),
    _p("right-sided", (), ("R-sided", "R sided")),
    _p("left", (), ("L", "lt")),
    _p("right", (), ("R", "rt")),
    _p("with", (), ("w/",)),
    _p("history of", (), ("hx", "h/o")),
    # breathing, chest and heart
    _p("shortness of breath", ("breathlessness", "dyspnoea"), ("SOB",), ("feeling short of breath", "out of breath")),  # noqa: E501
    _p("breathlessness on exertion", ("exertional dyspnoea", "dyspnoea on exertion"), ("SOBOE", "DOE"), ("out of breath walking",)),  # noqa: E501
    _p("difficulty breathing", ("laboured breathing",), ("diff breathing",), ("struggling to breathe",)),  # noqa: E501
    _p("chest pain", ("pain in the chest",), ("CP",), ("pain in the chest",)),
    _p("central crushing chest pain", ("crushing central chest pain", "central chest pain, crushing in nature"), ("central crushing CP",), ("a crushing pain in the middle of the chest",)),  # noqa: E501
    _p("chest tightness", ("tightness in the chest",), ("tight chest",), ("tight feeling in the chest",)),  # noqa: E501
    _p("pleuritic chest pain", ("chest pain worse on breathing in",), ("pleuritic CP",), ("sharp chest pain when breathing in",)),  # noqa: E501
    _p("pleuritic pain", ("pain on deep inspiration",), (), ("pain on breathing in",)),
    _p("sharp pain", ("stabbing pain",), (), ("stabbing pain",)),
    _p("palpitations", (), ("palps",), ("heart racing", "a fast heartbeat")),
    _p("irregular heartbeat", ("irregular heart beat",), ("irreg HR",), ("heart skipping beats",)),
    _p("fluttering in the chest", ("a fluttering sensation in the chest",), (), ("heart fluttering",)),  # noqa: E501
    _p("irregularly irregular pulse", ("pulse irregularly irregular",), ("pulse irreg irreg", "IRIR pulse"), ()),  # noqa: E501
    _p("orthopnoea", ("breathlessness lying flat",), (), ("breathless lying flat",)),
    _p("paroxysmal nocturnal dyspnoea", (), ("PND",), ("waking up breathless at night",)),
    _p("PND", ("paroxysmal nocturnal dyspnoea",), (), ("waking up breathless at night",)),
    _p("sleeping on three pillows", ("three-pillow orthopnoea",), ("3 pillows",), ()),
    _p("ankle swelling", ("ankle oedema", "swollen ankles"), ("ankle oedema",), ("puffy ankles", "swollen ankles")),  # noqa: E501
    _p("raised JVP", ("JVP elevated",), ("JVP↑", "↑JVP"), ()),
    _p("pitting oedema to the knees", ("pitting oedema up to the knees",), ("POE to knees",), ("legs swollen up to the knees",)),  # noqa: E501
    _p("bibasal crackles", ("bibasal crepitations", "crackles at both bases"), ("bibasal creps",), ()),  # noqa: E501
    _p("coarse crackles", ("coarse crepitations",), ("coarse creps",), ()),
    _p("dull lung bases", ("dullness at both bases",), ("dull bases",), ()),
    _p("wheeze", ("wheezing",), ("wheezy",), ("wheezing",), r"^wheeze$"),
    _p("wheeze", ("wheezing",), (), ("wheezing",), r"(?<=\w )wheeze"),
    _p("cough", (), (), ("coughing",), r"(?<!weak )cough"),
    _p("productive cough", ("cough productive of sputum", "wet cough"), (), ("chesty cough",)),
    _p("dry cough", ("non-productive cough",), (), ("tickly cough",)),
    _p("nocturnal cough", ("cough at night",), (), ("coughing at night",)),
    _p("night-time cough", ("nocturnal cough", "cough at night"), (), ("coughing at night",)),
    _p("sputum production", ("expectoration",), (), ("coughing up phlegm",)),
    _p("sputum", ("phlegm",), (), ("phlegm",), r"sputum(?! culture)"),
    _p("haemoptysis", (), (), ("coughing up blood",)),
    _p("tachypnoeic", ("tachypnoea",), (), ("breathing fast",)),
    _p("use of accessory muscles", ("accessory muscle use",), (), ("using neck muscles to breathe",)),  # noqa: E501
    _p("peak flow", ("PEFR",), ("PEF", "PF"), ()),
    _p("sinus tachycardia", (), ("sinus tachy",)),
    _p("ST elevation", ("ST-segment elevation",), ("STE", "ST↑")),
    _p("ST depression", ("ST-segment depression",), ("ST↓",)),
    _p("left bundle branch block", (), ("LBBB",)),
    _p("atrial fibrillation", (), ("AF",)),
    _p("myocardial infarction", ("heart attack",), ("MI",), ("heart attack",)),
    _p("ischaemic heart disease", ("coronary artery disease",), ("IHD", "CAD")),
    _p("early diastolic murmur", (), ("EDM",)),
    _p("clammy and grey", ("grey and clammy",), ("grey + clammy",), ("grey and sweaty",)),
    _p("diaphoretic", ("sweaty",), ("sweaty",), ("sweaty",)),
    _p("sweating", ("diaphoresis", "sweatiness"), ("sweaty",), ("feeling sweaty",), r"^sweating$"),
    _p("sweating", ("diaphoresis",), (), (), r"(?<=\w )sweating"),
    _p("pale", ("pallor",), (), ("very pale",), r"^pale$"),
    _p("lightheadedness", ("feeling faint",), (), ("feeling faint", "woozy")),
    _p("dizziness", (), (), ("feeling dizzy", "dizzy spells")),
    _p("collapse", (), (), ("a collapse",), r"^collapse$"),
    _p("brief loss of consciousness", ("brief syncope",), ("brief LOC",), ("a brief blackout",)),
    # abdomen and urine
    _p("abdominal pain", ("pain in the abdomen",), ("abdo pain",), ("tummy pain", "stomach ache")),
    _p("{a} abdominal pain", ("pain in the {a} abdomen",), ("{a} abdo pain",), (), r"(?P<a>upper|lower) abdominal pain"),  # noqa: E501
    _p("crampy abdominal pain", ("colicky abdominal pain",), ("crampy abdo pain",), ("tummy cramps",)),  # noqa: E501
    _p("abdominal cramps", ("cramping abdominal pain",), ("abdo cramps",), ("tummy cramps",)),
    _p("abdominal distension", ("distended abdomen",), ("abdo distension",), ("bloated tummy",)),
    _p("periumbilical pain", ("central abdominal pain",), ("central abdo pain",), ("pain around the belly button",)),  # noqa: E501
    _p("right iliac fossa", ("right lower quadrant",), ("RIF", "RLQ")),
    _p("left iliac fossa", ("left lower quadrant",), ("LIF", "LLQ")),
    _p("right upper quadrant", (), ("RUQ",)),
    _p("pain migrating from the umbilicus to the right iliac fossa", ("periumbilical pain moving to the right iliac fossa", "pain that started centrally and moved to the right iliac fossa"), ("pain central → RIF", "periumbilical pain → RIF"), ("pain started around the belly button and moved to the right",)),  # noqa: E501
    _p("migration of pain to the right iliac fossa", ("pain moving to the right iliac fossa",), ("pain → RIF",), ()),  # noqa: E501
    _p("tenderness", (), ("TTP",), ("soreness",), r"(?<!rebound )tenderness"),
    _p("tender right upper quadrant", ("right upper quadrant tender",), ("RUQ TTP",), ("sore under the right ribs",)),  # noqa: E501
    _p("exquisitely tender joint", ("joint exquisitely tender",), (), ("joint very sore to touch",)),  # noqa: E501
    _p("epigastric tenderness", ("tender epigastrium",), ("epigastric TTP",), ()),
    _p("guarding", ("guarding present",), (), (), r"^guarding$"),
    _p("soft abdomen", ("abdomen soft",), ("abdo soft",), ("tummy soft",)),
    _p("nausea and vomiting", ("vomiting and nausea",), ("N/V", "N+V"), ("feeling and being sick",)),  # noqa: E501
    _p("diarrhoea and vomiting", ("vomiting and diarrhoea",), ("D&V", "D+V"), ("sickness and diarrhoea",)),  # noqa: E501
    _p("vomiting", ("emesis",), ("vom",), ("being sick",)),
    _p("persistent vomiting", ("intractable vomiting",), ("persistent vom",), ("being sick non-stop",)),  # noqa: E501
    _p("nausea", ("feeling nauseated",), (), ("feeling sick",)),
    _p("diarrhoea", ("loose stools",), (), ("loose motions",), r"(?<!watery )diarrhoea"),
    _p("watery diarrhoea", ("watery stools",), (), ("the runs",)),
    _p("watery stools eight times a day", ("eight watery stools a day",), ("BO x8/day, watery",), ("the runs eight times a day",)),  # noqa: E501
    _p("unwell contacts", ("sick contacts",), (), ("others at home ill too",)),
    _p("reduced oral intake", ("poor oral intake",), ("↓ oral intake", "poor PO intake"), ("eating and drinking less",)),  # noqa: E501
    _p("anorexia", ("loss of appetite",), (), ("off food",)),
    _p("reduced appetite", ("poor appetite",), ("↓ appetite",), ("off food",)),
    _p("pain after {x}", ("pain following {x}",), (), ("pain after eating {x}",), r"pain after (?P<x>fatty (?:meals|food))"),  # noqa: E501
    _p("dry mucous membranes", ("dry mucosae",), ("DMM",), ("dry mouth and lips",)),
    _p("jaundice", ("icterus",), (), ("yellow skin",)),
    _p("gallstones", ("cholelithiasis",), (), ()),
    _p("dysuria", (), (), ("pain passing urine", "stinging on passing urine")),
    _p("burning on passing urine", ("dysuria",), (), ("stinging when passing urine",)),
    _p("urinary frequency", ("frequency of micturition",), (), ("passing urine often",)),
    _p("frequency", ("urinary frequency",), (), ("passing urine often",), r"^frequency$"),
    _p("haematuria", ("blood in the urine",), (), ("blood in the urine",)),
    _p("blood in the urine", ("haematuria",), (), ()),
    _p("cloudy offensive urine", ("cloudy foul-smelling urine",), (), ("smelly cloudy urine",)),
    _p("suprapubic pain", ("pain above the pubic bone",), ("SP pain",), ("pain low in the tummy",)),
    _p("loin pain", ("flank pain",), (), ("pain in the side",)),
    _p("loin to groin pain", ("pain from loin to groin",), ("loin→groin pain",), ()),
    _p("colicky flank pain", ("flank pain, colicky in nature",), (), ("flank pain coming in waves",)),  # noqa: E501
    _p("waves of pain", ("pain coming in waves",), (), ("pain coming in waves",)),
    _p("writhing in pain", ("unable to lie still",), (), ()),
    _p("renal angle tenderness", ("tenderness at the renal angle",), ("renal angle TTP",), ()),
    _p("reduced urine output", ("oliguria", "low urine output"), ("↓UO",), ("passing less urine",)),
    _p("urine dip", ("urinalysis", "urine dipstick"), ("UA", "dip")),
    _p("vaginal bleeding", ("PV bleeding",), ("PV bleed", "PVB"), ("bleeding down below",)),
    _p("vaginal spotting", ("PV spotting",), ("PV spotting",), ("light bleeding",)),
    _p("missed period", ("amenorrhoea",), (), ("period is late",)),
    _p("last period 7 weeks ago", ("LMP 7 weeks ago",), ("LMP 7/52 ago",), ()),
    _p("sexually active without contraception", (), ("UPSI",), ()),
    _p("cervical excitation", ("cervical motion tenderness",), ("CMT",), ()),
    # head, nerves and senses
    _p("headache", (), ("HA", "h/a"), ("head pain",)),
    _p("throbbing unilateral headache", ("unilateral throbbing headache", "one-sided throbbing headache"), ("throbbing unilat HA",), ("one-sided pounding headache",)),  # noqa: E501
    _p("thunderclap headache", (), ("thunderclap HA",), ()),
    _p("worst headache of life", ("worst headache ever",), ("worst HA ever",), ("worst headache ever",)),  # noqa: E501
    _p("{x} maximal {y}", ("{x} peaking {y}",), (), (), r"(?P<x>headache|pain) maximal (?P<y>within a minute|at onset)"),  # noqa: E501
    _p("photophobia", ("sensitivity to light",), (), ("light hurting the eyes",)),
    _p("phonophobia", ("sensitivity to noise",), (), ("dislike of noise",)),
    _p("neck stiffness", ("meningism", "nuchal rigidity", "stiff neck"), (), ("stiff neck",)),
    _p("new confusion", ("acute confusion", "new-onset confusion"), (), ("acting confused",)),
    _p("confusion", ("disorientation",), (), ()),
    _p("drowsy", (), (), ("very sleepy",), r"^drowsy$"),
    _p("drowsiness", ("reduced alertness",), (), ("sleepiness",)),
    _p("{s} weakness", ("weakness of the {s} side",), (), ("weakness down the {s} side",), r"(?P<s>right|left)-sided weakness"),  # noqa: E501
    _p("{s} arm weakness", ("weakness of the {s} arm",), (), ("{s} arm going weak",), r"(?P<s>right|left) arm weakness"),  # noqa: E501
    _p("ascending weakness", ("weakness ascending from the feet",), (), ("weakness creeping up the legs",)),  # noqa: E501
    _p("slurred speech", ("dysarthria", "slurring of speech"), (), ("speech slurred",)),
    _p("facial droop", ("facial asymmetry", "drooping of the face"), (), ("face drooping",), r"(?<!right )(?<!left )facial droop"),  # noqa: E501
    _p("facial droop", ("facial weakness",), (), (), r"(?:(?<=right )|(?<=left ))facial droop"),
    _p("difficulty swallowing", ("dysphagia",), (), ("trouble swallowing",)),
    _p("double vision", ("diplopia",), (), ("seeing double",)),
    _p("drooping eyelids", ("ptosis",), (), ("droopy eyelids",)),
    _p("visual disturbance", ("visual symptoms",), (), ("problems with vision",)),
    _p("visual loss", ("loss of vision",), (), ("losing vision",)),
    _p("transient loss of vision", ("amaurosis fugax", "transient visual loss"), (), ("brief loss of sight",)),  # noqa: E501
    _p("visual aura", (), (), ("zigzag lines in the vision",)),
    _p("zigzag lines before the headache", ("a visual aura of zigzag lines", "fortification spectra before the headache"), ("zigzag aura",), ("zigzag lines first",)),  # noqa: E501
    _p("jaw claudication", ("jaw pain on chewing",), (), ("jaw aching when chewing",)),
    _p("jaw pain on chewing", ("jaw claudication",), (), ("jaw aching when chewing",)),
    _p("tingling in the {x}", ("paraesthesia in the {x}",), (), ("pins and needles in the {x}",), r"tingling in the (?P<x>feet and hands|feet|hand)"),  # noqa: E501
    _p("pins and needles", ("paraesthesia",), (), ()),
    _p("scalp tenderness", ("tender scalp",), (), ("sore scalp",)),
    _p("shoulder girdle stiffness", ("stiffness of the shoulders",), (), ("stiff shoulders",)),
    _p("absent ankle and knee reflexes", ("areflexia at the knees and ankles",), ("knee + ankle jerks absent",), ()),  # noqa: E501
    _p("flexor plantars", ("downgoing plantars",), ("plantars ↓↓",), ()),
    _p("no focal neurology", ("neurologically intact", "no focal neurological deficit"), ("no FND", "neuro intact"), ()),  # noqa: E501
    _p("fatigable weakness", ("fatiguability",), (), ()),
    _p("choking on fluids", ("coughing on drinking",), (), ("choking on drinks",)),
    _p("GCS {n}", ("GCS {n}/15",), ("GCS{n}",), (), r"GCS (?P<n>\d+)"),
    # skin, limbs and joints
    _p("skin redness", ("erythema",), (), ("red skin",)),
    _p("spreading redness", ("spreading erythema",), (), ("redness spreading",)),
    _p("calf swelling", ("swelling of the calf", "swollen calf"), (), ("swollen calf",)),
    _p("lip swelling", ("swollen lips", "lip angioedema"), (), ("swollen lips",)),
    _p("facial swelling", ("swelling of the face",), (), ("swollen face",)),
    _p("joint swelling", ("swollen joint", "joint effusion"), (), ("swollen joint",)),
    _p("unilateral leg swelling", ("one-sided leg swelling", "swelling of one leg"), (), ()),
    _p("{s} leg swelling", ("swelling of the {s} leg", "swollen {s} leg"), (), (), r"(?P<s>right|left) leg swelling"),  # noqa: E501
    _p("skin blistering", ("bullae",), (), ("blisters",)),
    _p("haemorrhagic bullae", ("blood-filled blisters",), (), ("blood blisters",)),
    _p("crepitus in the soft tissues", ("soft tissue crepitus",), (), ()),
    _p("pain out of proportion to appearance", ("pain out of proportion to the clinical signs",), ("pain >> signs",), ("pain far worse than it looks",)),  # noqa: E501
    _p("pain on walking", ("pain when walking",), (), ("pain when walking",)),
    _p("widespread urticaria", ("generalised urticaria", "widespread hives"), (), ("hives all over",)),  # noqa: E501
    _p("itching", ("pruritus",), (), ("itchy skin",)),
    _p("hoarse voice", ("hoarseness", "dysphonia"), (), ("croaky voice",)),
    _p("throat tightness", ("tightness in the throat",), (), ("tight throat",)),
    _p("unable to bear the bedsheet on it", ("cannot tolerate the bedsheet on it",), (), ("pain with even the sheet touching it",)),  # noqa: E501
    _p("woken by pain overnight", ("pain waking from sleep",), (), ("pain waking at night",)),
    _p("cold peripheries", ("peripherally cold",), (), ("cold hands and feet",)),
    _p("mottled {x}", ("mottling of the {x}",), (), (), r"mottled (?P<x>peripheries|skin)"),
    _p("capillary refill {n} seconds", ("capillary refill time {n} s",), ("CRT {n}s", "cap refill {n}s"), (), r"capillary refill (?P<n>\d+) seconds"),  # noqa: E501
    # general
    _p("fever", ("pyrexia", "temperatures"), (), ("high temperature",), r"(?<!hay )fever"),
    _p("{m} fever", ("{m} pyrexia",), ("{m} temp",), ("a bit of a temperature",), r"(?P<m>low-grade|mild) fever"),  # noqa: E501
    _p("rigors", ("shaking chills",), (), ("shivering fits", "uncontrollable shaking")),
    _p("night sweats", ("nocturnal sweating",), (), ("drenching sweats at night",)),
    _p("weight loss", ("unintentional weight loss",), ("wt loss",), ("losing weight",)),
    _p("weight gain of {n} kg", ("{n} kg weight gain",), ("wt ↑{n}kg",), (), r"weight gain of (?P<n>\d+) kg"),  # noqa: E501
    _p("fatigue", ("tiredness", "lethargy"), (), ("feeling tired",)),
    _p("feeling generally unwell", ("general malaise",), ("generally unwell", "GUW"), ("under the weather",)),  # noqa: E501
    _p("general malaise", ("feeling generally unwell",), ("malaise",), ()),
    _p("agitation", ("restlessness",), (), ()),
    _p("muscle aches", ("myalgia",), (), ("aching muscles",)),
    _p("heat intolerance", (), (), ("feeling too hot all the time",)),
    _p("polyuria", ("passing large volumes of urine",), (), ("passing a lot of urine",)),
    _p("polydipsia", ("excessive thirst",), (), ("constant thirst",)),
    _p("excessive thirst", ("polydipsia",), (), ("constant thirst",)),
    _p("salt craving", ("craving for salt",), (), ("craving salty food",)),
    _p("missed insulin doses", ("omitted insulin",), ("missed insulin",), ("forgotten insulin doses",)),  # noqa: E501
    _p("missed steroid doses", ("omitted steroids",), (), ("forgotten steroid tablets",)),
    _p("postural hypotension", ("orthostatic hypotension",), ("postural drop",), ()),
    _p("off legs", ("reduced mobility",), ("off legs",), ()),
    _p("fall at home", ("fall",), ("fall",), ("a fall at home",)),
    # more findings of the catalogue, one wording each beside its own
    _p("chest discomfort", ("discomfort in the chest",), (), ("chest ache",)),
    _p("epigastric pain", ("pain in the epigastrium",), (), ("pain at the top of the stomach",)),
    _p("epigastric discomfort", ("discomfort in the epigastrium",), (), ("indigestion-like discomfort",)),  # noqa: E501
    _p("back pain", ("pain in the back",), (), ("backache",), r"(?<!lower )(?<!interscapular )back pain"),  # noqa: E501
    _p("leg pain", ("pain in the leg",), (), ("sore leg",)),
    _p("jaw pain", ("pain in the jaw",), (), ("aching jaw",)),
    _p("neck pain", ("pain in the neck",), (), ("sore neck",)),
    _p("shoulder tip pain", ("pain at the shoulder tip",), (), ("pain in the tip of the shoulder",)),  # noqa: E501
    _p("tearing pain", ("ripping pain",), (), ("pain like something tearing",)),
    _p("tearing quality", ("tearing in character",), (), ("tearing feeling",)),
    _p("anxiety", ("anxiousness",), (), ("feeling anxious",), r"^anxiety$"),
    _p("presyncope", ("near-syncope",), (), ("nearly fainting",)),
    _p("confused", ("disorientated",), (), ("muddled",), r"^confused$"),
    _p("flushed", ("facial flushing",), (), ("red in the face",)),
    _p("dysarthria", ("slurred speech",), (), ("speech slurred",), r"^dysarthria$"),
    _p("arm drift", ("pronator drift",), (), ()),
    _p("word-finding difficulty", ("nominal dysphasia",), (), ("struggling to find words",)),
    _p("witnessed by family", ("witnessed by relatives",), ("witnessed",), ()),
    _p("deficit noticed on waking", ("deficit present on waking",), (), ()),
    _p("expressive dysphasia", ("expressive aphasia",), (), ()),
    _p("extensor plantar", ("upgoing plantar",), ("plantar ↑",), ()),
    _p("central cyanosis", ("centrally cyanosed",), (), ("blue lips",)),
    _p("clear chest", ("chest clear",), ("chest clear",), ()),
    _p("pleural rub", ("pleural friction rub",), (), ()),
    _p("prolonged expiration", ("prolonged expiratory phase",), (), ()),
    _p("speaking in short phrases", ("speaking in phrases only",), (), ()),
    _p("using blue inhaler every hour", ("using salbutamol hourly",), ("salbutamol 1-hourly",), ()),
    _p("triggered by a cold", ("triggered by a viral illness",), ("post-viral",), ()),
    _p("exposure to a cat", ("cat exposure",), (), ("contact with a cat",)),
    _p("pursed-lip breathing", ("breathing through pursed lips",), (), ()),
    _p("tar-stained fingers", ("nicotine-stained fingers",), ("tar staining",), ()),
    _p("barrel chest", ("hyperexpanded chest",), (), ()),
    _p("home oxygen", ("long-term oxygen therapy",), ("LTOT",), ()),
    _p("two exacerbations this year", ("2 exacerbations this year",), ("2 exacerbations/yr",), ()),
    _p("tall thin build", ("tall and thin",), (), ()),
    _p("onset at rest", ("onset while at rest",), (), ()),
    _p("tracheal deviation", ("trachea deviated",), (), ()),
    _p("abdominal bloating", ("bloating",), (), ("bloated tummy",)),
    _p("hepatomegaly", ("enlarged liver",), (), ()),
    _p("third heart sound", ("S3 gallop",), ("S3",), ()),
    _p("fourth heart sound", (), ("S4",), ()),
    _p("normal heart sounds", ("heart sounds normal",), ("HS normal",), ()),
    _p("no murmurs", ("no added sounds",), ("no murmur",), ()),
    _p("variable intensity first heart sound", (), ("variable S1",), ()),
    _p("apical-radial pulse deficit", ("pulse deficit",), (), ()),
    _p("distended superficial veins", ("dilated superficial veins",), (), ()),
    _p("tender along the deep veins", ("tenderness along the deep veins",), (), ()),
    _p("leg heaviness", ("heaviness of the leg",), (), ("heavy leg",)),
    _p("leg tightness", ("tightness of the leg",), (), ("tight leg",)),
    _p("warmth", ("local warmth",), (), ("hot to touch",), r"^warmth$"),
    _p("warm tender swelling", ("warm, tender swelling",), (), ()),
    _p("blistering", ("blisters",), (), (), r"^blistering$"),
    _p("lymphangitis", ("ascending lymphangitis",), (), ()),
    _p("tender inguinal nodes", ("tender inguinal lymphadenopathy",), (), ()),
    _p("poorly demarcated erythema over the shin", ("poorly demarcated redness over the shin",), (), ()),  # noqa: E501
    _p("painful red area on the shin", ("painful area of redness on the shin",), (), ("sore red patch on the shin",)),  # noqa: E501
    _p("area of redness marked", ("margin of the erythema marked",), ("redness marked",), ()),
    _p("a small cut on the foot", ("a minor wound on the foot",), (), ()),
    _p("shiny red skin over the joint", ("erythematous shiny skin over the joint",), (), ()),
    _p("acute joint pain", ("acute arthralgia",), (), ("sudden painful joint",)),
    _p("swollen ankle", ("ankle swelling",), (), ()),
    _p("rash", ("skin rash",), (), (), r"^rash$"),
    _p("non-blanching rash", ("purpuric rash",), ("NBR",), ()),
    _p("petechial rash on the legs", ("petechiae on the legs",), (), ()),
    _p("dusky purple skin", ("dusky violaceous skin",), (), ()),
    _p("anaesthetic skin", ("numb skin over the area",), (), ()),
    _p("tense oedema beyond the erythema", ("tense swelling beyond the redness",), (), ()),
    _p("rapid spread over hours", ("spreading within hours",), (), ("spreading by the hour",)),
    _p("perineal pain and swelling", ("painful swollen perineum",), (), ()),
    _p("urgency", ("urinary urgency",), (), ("needing to rush to the toilet",), r"^urgency$"),
    _p("lower abdominal guarding", ("guarding in the lower abdomen",), (), ()),
    _p("peritonism", ("peritoneal signs",), (), (), r"^peritonism$"),
    _p("no peritonism", ("no peritoneal signs",), (), ()),
    _p("periumbilical bruising", ("Cullen's sign",), (), ()),
    _p("flank bruising", ("Grey Turner's sign",), (), ()),
    _p("hyperactive bowel sounds", ("bowel sounds hyperactive",), (), ()),
    _p("ketotic breath", ("ketones on the breath", "pear-drop breath"), (), ()),
    _p("Kussmaul breathing", ("Kussmaul respiration", "deep sighing breathing"), (), ()),
    _p("rapid breathing", ("tachypnoea",), (), ("breathing fast",)),
    _p("weak voice", ("quiet voice",), (), ()),
    _p("nasal speech", ("nasal voice",), (), ()),
    _p("weak neck flexion", ("neck flexion weakness",), (), ()),
    _p("paradoxical breathing", ("paradoxical abdominal breathing",), (), ()),
    _p("weakness worse at the end of the day", ("weakness worse in the evening",), (), ()),
    _p("weakness spreading up from the legs", ("weakness ascending from the legs",), (), ("weakness creeping up from the legs",)),  # noqa: E501
    _p("symmetrical leg weakness", ("symmetrical weakness of both legs",), (), ()),
    _p("power 3/5 in both legs", ("both legs power 3/5",), ("power 3/5 bilat LL",), ()),
    _p("transient arm weakness", ("transient weakness of the arm",), (), ()),
    _p("tingling of the hand before onset", ("hand tingling before onset",), (), ()),
    _p("lying in a dark room", ("lying in a darkened room",), (), ()),
    _p("normal fundi", ("fundi normal",), ("fundi NAD",), ()),
    _p("third nerve palsy", ("oculomotor nerve palsy",), ("CN III palsy", "3rd nerve palsy"), ()),
    _p("tender thickened temporal artery", ("thickened tender temporal artery",), (), ()),
    _p("absent temporal pulse", ("temporal pulse absent",), (), ()),
    _p("pale swollen optic disc", ("swollen pale optic disc",), (), ()),
    _p("fine tremor", ("fine peripheral tremor",), (), ("shaky hands",)),
    _p("warm moist skin", ("warm sweaty skin",), (), ()),
    _p("hyperreflexia", ("brisk reflexes",), (), ()),
    _p("exophthalmos", ("proptosis",), (), ()),
    _p("tremor", ("tremulousness",), (), ("shaking",), r"^tremor$"),
    _p("thirst", ("polydipsia",), (), ("feeling thirsty",), r"^thirst$"),
    _p("stopped carbimazole", ("carbimazole stopped",), (), ()),
    _p("buccal pigmentation", ("pigmentation of the buccal mucosa",), (), ()),
    _p("hyperpigmented palmar creases", ("pigmented palmar creases",), (), ()),
    _p("postural drop", ("postural hypotension",), (), ()),
    _p("steroid use", ("steroid treatment",), (), ()),
    _p("new food or drug exposure", ("new food or medication exposure",), (), ()),
    _p("onset after IV co-amoxiclav", ("onset following IV co-amoxiclav",), (), ()),
    _p("onset minutes after eating peanuts", ("onset within minutes of eating peanuts",), (), ()),
    _p("collapse after a bee sting", ("collapse following a bee sting",), (), ()),
    _p("lip and tongue swelling", ("swelling of the lips and tongue",), (), ("swollen lips and tongue",)),  # noqa: E501
    _p("limb weakness", ("weakness of a limb",), (), ()),
    _p("active cancer", ("current malignancy",), ("active malignancy",), ()),
    _p("immobility", ("reduced mobility",), (), ()),
    _p("obesity", ("raised BMI",), (), (), r"^obesity$"),
    _p("hypothyroidism", (), (), ("underactive thyroid",)),
    _p("cannabis use", ("cannabis smoker",), (), ()),
    _p("urinary catheter", ("long-term catheter",), ("LTC",), ()),
    _p("recurrent UTIs", ("recurrent urinary infections",), (), ()),
    _p("low fluid intake", ("poor fluid intake",), (), ()),
    _p("insulin pump user", ("on an insulin pump",), (), ()),
    _p("Marfan syndrome", (), ("Marfan's",), ()),
    _p("poor inhaler adherence", ("poor compliance with inhalers",), (), ()),
    _p("peaked T waves", ("tall tented T waves",), (), ()),
    _p("widened mediastinum", ("wide mediastinum",), (), ()),
    _p("ejection fraction 30%", ("LVEF 30%",), ("EF 30%",), ()),
    _p("no abnormality", ("normal",), ("NAD",), ()),
    _p("no haemorrhage", ("no bleed",), ("no bleed",), ()),
    _p("no organisms", ("no organisms seen",), (), ()),
    _p("type 1 respiratory failure", (), ("T1RF",), ()),
    _p("high anion gap metabolic acidosis", (), ("HAGMA",), ()),
    _p("regional wall motion abnormality", (), ("RWMA",), ()),
    # background
    _p("hypertension", (), ("HTN",), ("high blood pressure",)),
    _p("type 2 diabetes", ("type 2 diabetes mellitus",), ("T2DM",), ("diabetes",)),
    _p("type 1 diabetes", ("type 1 diabetes mellitus",), ("T1DM", "IDDM"), ()),
    _p("chronic kidney disease", (), ("CKD",), ("kidney problems",)),
    _p("osteoarthritis", (), ("OA",), ("arthritis",)),
    _p("hypercholesterolaemia", ("raised cholesterol",), ("high chol",), ("high cholesterol",)),
    _p("GORD", ("reflux disease",), (), ("acid reflux",)),
    _p("depression", ("low mood",), (), ()),
    _p("smoker", ("current smoker",), ("smokes 20/day",), (), r"^smoker$"),
    _p("alcohol excess", ("excess alcohol intake",), ("EtOH excess", "ETOH"), ()),
    _p("heavy drinking", ("binge drinking",), ("EtOH binge",), ()),
    _p("intravenous drug use", ("injecting drug use",), ("IVDU",), ()),
    _p("immunosuppressed", ("immunocompromised",), (), ()),
    _p("combined oral contraceptive pill", (), ("COCP", "OCP"), ("the pill",)),
    _p("care home resident", ("nursing home resident",), ("NH resident",), ()),
    _p("blood pressure", (), ("BP",)),
    # investigations
    _p("CXR", ("chest X-ray", "chest radiograph"), ()),
    _p("LP", ("lumbar puncture",), ()),
    _p("CT head", ("CT brain",), ("CTH",)),
    _p("CT angiogram", (), ("CTA",)),
    _p("ultrasound", (), ("USS", "US")),
    _p("echo", ("echocardiogram",), ("TTE",)),
    _p("ABG", ("arterial blood gas",), ()),
    _p("VBG", ("venous blood gas",), ("venous gas",)),
    _p("Doppler", ("duplex ultrasound",), ()),
    _p("blood cultures", (), ("BCs", "BC")),
    _p("DVT", ("deep vein thrombosis",), ()),
)

# fmt: on
_RULE_RES = tuple(re.compile(rf"(?<![\w'-])(?:{rule.pattern})(?![\w'-])") for rule in PARAPHRASES)
_Segment = str | tuple[int, tuple[tuple[str, str], ...]]


@cache
def segments(phrase: str) -> tuple[_Segment, ...]:
    """The phrase split into literal text and non-overlapping rule matches (longest first)."""
    found = [
        (m.start(), m.end(), i, tuple((k, v) for k, v in m.groupdict().items() if v is not None))
        for i, rx in enumerate(_RULE_RES)
        for m in rx.finditer(phrase)
        if m.end() > m.start()
    ]
    found.sort(key=lambda f: (f[0] - f[1], bool(f[3]), f[2]))  # longest, literal, first
    taken = [False] * len(phrase)
    chosen = []
    for start, end, i, groups in found:
        if not any(taken[start:end]):
            taken[start:end] = [True] * (end - start)
            chosen.append((start, end, i, groups))
    out: list[_Segment] = []
    position = 0
    for start, end, i, groups in sorted(chosen):
        if position < start:
            out.append(phrase[position:start])
        out.append((i, groups))
        position = end
    if position < len(phrase):
        out.append(phrase[position:])
    return tuple(out)


def join_and(words: str) -> str:
    parts = words.split()
    return parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"


@cache
def variants(phrase: str) -> frozenset[str]:
    """Every wording the generator may give ``phrase`` (the catalogue's own one included)."""
    options: list[list[str]] = []
    for segment in segments(phrase):
        if isinstance(segment, str):
            options.append([segment])
            continue
        i, groups = segment
        rule = PARAPHRASES[i]
        inner = {k: sorted(variants(v)) for k, v in groups}
        keys = list(inner)
        out = []
        for template in (*rule.formal, *rule.short, *rule.lay):
            for values in product(*(inner[k] for k in keys)):
                filled = dict(zip(keys, values, strict=True))
                raw = {k: v for k, v in groups}
                out.append(
                    template.format(**filled, **{f"{k}_and": join_and(raw[k]) for k in keys})
                )
        options.append(out)
    return frozenset("".join(parts) for parts in product(*options))
