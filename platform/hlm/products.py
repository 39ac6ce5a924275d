"""The product vocabulary of the built-in catalogue (`hlm.catalog`): departments, brands, product types, attributes.

Each attribute value has the form ad copy writes it in and the forms people type ("20V MAX" | "20v", "20 volt");
`Value.query` lists the typed forms, the ad form without dots and with units spelt out among them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True, eq=False)  # a vocabulary entry: compared by identity, which keeps grading fast
class Value:
    """One attribute value: how ad copy writes it ("20V MAX") and how people type it ("20v", "20 volt")."""

    ad: str
    query: tuple[str, ...]

    @property
    def trails(self) -> bool:  # "with 2 Batteries", "for Metal" read after the product name, in titles and queries
        return self.ad.startswith(("with ", "for "))


@dataclass(frozen=True)
class ProductType:
    name: str  # canonical, lower case: the first ad name; also the first keyword of each of its ads
    dept: str
    ad_names: tuple[str, ...]
    query_names: tuple[str, ...]
    axes: tuple[tuple[str, tuple[Value, ...]], ...]


_SPOKEN = ((re.compile(r"(\d) in\b"), r"\1 inch"), (re.compile(r"(\d) ft\b"), r"\1 foot"),
           (re.compile(r"(\d) gal\b"), r"\1 gallon"), (re.compile(r"(\w)-(\w)"), r"\1 \2"))


def _value(spec: str) -> Value:
    """'Ad Form|typed|…': also typed as the ad form without dots, then with units spelt out and no hyphens."""
    ad, *typed = spec.strip().split("|")
    plain = spoken = ad.lower().replace(". ", " ").removesuffix(".")  # "12 in. x 12 in." -> "12 in x 12 in"
    for pattern, repl in _SPOKEN:  # -> "12 inch x 12 inch"; "semi-gloss" -> "semi gloss"
        spoken = pattern.sub(repl, spoken)
    return Value(ad, tuple(dict.fromkeys([plain, spoken, *typed])))


def _type(dept: str, ad_names: str, query_names: str, **axes: str) -> ProductType:
    """Names are '|'-separated (ad names are also typed, lower-cased); an axis is 'Ad Form|typed|typed; …'."""
    names = ad_names.split("|")
    typed = tuple(dict.fromkeys([n.lower() for n in names] + query_names.split("|")))
    return ProductType(names[0].lower(), dept, tuple(names), typed,
                       tuple((axis, tuple(_value(v) for v in spec.split(";"))) for axis, spec in axes.items()))


# Department: brands (spec as for a value) and benefit phrases, participles so they fit every description template.
DEPARTMENTS = {
    "tools": ("DEWALT; Milwaukee; Makita; RYOBI; Bosch; RIDGID",
              ("built for demanding jobsite work", "backed by a 3-year limited warranty")),
    "paint": ("BEHR; Glidden; Valspar; Rust-Oleum|rustoleum; KILZ; PPG",
              ("formulated for one-coat hide and a scrubbable finish", "made with a low-odor, low-VOC formula")),
    "lighting": ("Hampton Bay; Globe Electric; Philips; Commercial Electric; Feit Electric|feit; Home Decorators",
                 ("designed to add warm, even light to any room", "sold with all mounting hardware included")),
    "plumbing": ("Moen; Delta; KOHLER; Glacier Bay; Pfister; American Standard",
                 ("backed by a lifetime limited warranty against leaks", "designed for easy DIY installation")),
    "flooring": ("Daltile; MSI; TrafficMaster; LifeProof; Merola Tile|merola; Home Decorators",
                 ("rated for residential and light commercial floors", "made to resist water, stains and scratches")),
    "ladders": ("Werner; Little Giant; Louisville Ladder; Gorilla Ladders|gorilla",
                ("built with slip-resistant steps and a pail shelf", "certified to meet OSHA and ANSI standards")),
    "outdoor": ("EGO; Greenworks; RYOBI; Toro; Husqvarna; Gilmour",
                ("built for fast, easy yard work", "designed to be light and easy to handle")),
    "storage": ("Husky; Milwaukee; Craftsman; DEWALT; Gladiator",
                ("fitted with ball-bearing drawer slides and a keyed lock", "made from heavy-gauge welded steel")),
}
BRANDS = {dept: tuple(_value(b) for b in spec.split(";")) for dept, (spec, _) in DEPARTMENTS.items()}
_FINISH = "Brushed Nickel|nickel; Matte Black|black; Chrome; Oil-Rubbed Bronze|bronze"
_VOLTS = "12V MAX|12v|12 volt; 18V|18v|18 volt; 20V MAX|20v|20 volt; 40V MAX|40v|40 volt"
_KIT = "Tool Only|bare tool; with 1 Battery|with battery; with 2 Batteries|with batteries|kit"
_LOAD = "225 lb. Load Capacity|225 lb|type ii; 250 lb. Load Capacity|250 lb|type i; 300 lb. Load Capacity|300 lb"
_LAMP = "Brushed Nickel|nickel; Matte Black|black; Antique Brass|brass|gold; White"
TYPES: tuple[ProductType, ...] = (
    _type("tools", "Cordless Drill|Drill Driver|Power Drill", "drill|battery drill", voltage=_VOLTS,
          motor="Brushless; Brushed", kit=_KIT),
    _type("tools", "Impact Driver|Cordless Impact Driver", "impact|impact gun", voltage=_VOLTS,
          motor="Brushless; Brushed", kit=_KIT),
    _type("tools", "Circular Saw|Circ Saw", "skil saw|skilsaw|saw", power="Cordless; Corded|15 amp",
          blade="6-1/2 in.; 7-1/4 in.; 8-1/4 in.", style="Sidewinder; Worm Drive; Track Saw|track"),
    _type("paint", "Interior Paint|Interior Paint and Primer|Interior Wall Paint", "wall paint|ceiling paint",
          color="Ultra Pure White|white; Swiss Coffee|off white; Silver Gray|gray; Navy Blue|navy; Sage Green|sage",
          finish="Flat|matte; Eggshell; Satin; Semi-Gloss", size="1 qt.|quart; 1 gal.|gallon; 5 gal."),
    _type("paint", "Exterior Paint|Exterior Paint and Primer|Exterior House Paint", "outdoor paint|house paint",
          color="White; Gray|grey; Beige|tan; Black; Barn Red|red", finish="Flat|matte; Satin; Semi-Gloss",
          size="1 gal.|gallon; 5 gal."),
    _type("paint", "Spray Paint|Aerosol Spray Paint|Spray Paint and Primer", "spray can|rattle can",
          color="Gloss Black|black; Flat White|white; Metallic Gold|gold; Apple Red|red; Hammered Silver|silver",
          surface="Multi-Purpose|all surface; for Metal|metal|rust; for Plastic|plastic; High Heat|grill"),
    _type("lighting", "Table Lamp|Bedside Table Lamp|Accent Lamp", "bedside lamp|nightstand lamp",
          finish=_LAMP + "; Clear Glass|glass", height="19 in.|small; 24 in.; 28 in.",
          feature="with USB Port|with usb|usb; with Dimmer|dimmable; with Linen Shade|linen shade"),
    _type("lighting", "Floor Lamp|Standing Floor Lamp", "standing lamp|tall lamp", finish=_LAMP,
          height="58 in.; 63 in.; 72 in.", style="Arc; Torchiere; Tripod; 3-Light Tree|tree"),
    _type("lighting", "LED Light Bulb|Dimmable LED Light Bulb|LED Bulb", "light bulb|led bulbs|bulbs",
          watts="40-Watt Equivalent|40w|40 watt; 60-Watt Equivalent|60w|60 watt; 100-Watt Equivalent|100w|100 watt",
          light="Soft White|2700k; Bright White|3000k; Daylight|5000k", shape="A19; BR30|flood; Candelabra|e12; PAR38"),
    _type("lighting", "Ceiling Fan|Ceiling Fan with Light|Ceiling Fan with Remote", "fan|ceiling fans",
          size="42 in.; 52 in.; 60 in.; 72 in.", finish=_FINISH + "; White", location="Indoor; Indoor/Outdoor|outdoor"),
    _type("plumbing", "Bathroom Faucet|Bathroom Sink Faucet|Lavatory Faucet", "vanity faucet|bath faucet",
          finish=_FINISH + "; Champagne Bronze|gold", handles="Single-Handle; 2-Handle|two handle",
          mount="4 in. Centerset|centerset|4 inch; 8 in. Widespread|widespread|8 inch; Single Hole|1 hole"),
    _type("plumbing", "Kitchen Faucet|Kitchen Sink Faucet", "kitchen tap|sink faucet kitchen",
          finish="Stainless Steel|stainless; Chrome; Matte Black|black; Champagne Bronze|gold",
          style="Pull-Down; Pull-Out; Touchless|motion sensor; Bridge", handles="Single-Handle; 2-Handle|two handle"),
    _type("plumbing", "Toilet|Water-Saving Toilet|Complete Toilet", "commode|toliet|toilets",
          shape="Elongated; Round Front|round; Compact Elongated|compact",
          height="Comfort Height|chair height|tall; Standard Height", flush="1.28 GPF|low flow; Dual Flush; 1.6 GPF"),
    _type("plumbing", "Shower Head|Showerhead|Bath Shower Head", "shower heads", finish=_FINISH,
          kind="Rain|rainfall; Handheld|hand held; Dual|2 in 1; Fixed|wall mount", flow="1.8 GPM|low flow; 2.5 GPM"),
    _type("flooring", "Floor Tile|Floor and Wall Tile|Porcelain Floor Tile", "floor tiles|tile flooring",
          size="12 in. x 12 in.|12x12; 12 in. x 24 in.|12x24; 24 in. x 24 in.|24x24; 6 in. x 36 in.|6x36|wood look",
          color="White; Gray|grey; Beige|tan; Black; Carrara|marble look", finish="Matte; Polished|glossy; Textured"),
    _type("flooring", "Subway Tile|Ceramic Wall Tile|Backsplash Tile", "backsplash|wall tile",
          color="Bright White|white; Glossy Black|black; Sage|green; Navy|blue; Gray|grey",
          size="3 in. x 6 in.|3x6; 4 in. x 12 in.|4x12; 2 in. x 8 in.|2x8", finish="Glossy|gloss; Matte; Beveled"),
    _type("flooring", "Vinyl Plank Flooring|Luxury Vinyl Plank Flooring|Waterproof Vinyl Flooring", "lvp|vinyl planks",
          look="Natural Oak|oak; Hickory; Gray Oak|gray|grey oak; Walnut; White Oak",
          thickness="6 mm|6mm; 8 mm|8mm; 12 mm|12mm|thick", wear="12 mil; 20 mil|commercial; 22 mil"),
    _type("ladders", "Step Ladder|Stepladder|Folding Step Ladder", "a frame ladder|step stool ladder",
          height="4 ft.; 6 ft.; 8 ft.; 10 ft.", material="Aluminum; Fiberglass", load=_LOAD),
    _type("ladders", "Extension Ladder|D-Rung Extension Ladder", "tall ladder|extending ladder",
          height="16 ft.; 20 ft.; 24 ft.; 28 ft.; 32 ft.", material="Aluminum; Fiberglass", load=_LOAD),
    _type("outdoor", "Lawn Mower|Walk-Behind Lawn Mower|Mower", "lawnmower|grass cutter", deck="20 in.; 21 in.; 22 in.",
          power="Gas; Cordless Electric|battery|cordless; Corded Electric|corded", drive="Self-Propelled; Push"),
    _type("outdoor", "Garden Hose|Water Hose", "hose|outdoor hose", diameter="1/2 in.|1/2; 5/8 in.|5/8",
          length="25 ft.; 50 ft.; 75 ft.; 100 ft.", material="Rubber; Vinyl; Hybrid Polymer|hybrid; Expandable"),
    _type("storage", "Tool Chest|Rolling Tool Cabinet|Tool Storage Chest", "tool box|toolbox|tool cabinet",
          color="Red; Black; Gray|grey; Blue", drawers="5-Drawer; 9-Drawer; 12-Drawer",
          width="26 in.; 41 in.; 46 in.; 52 in."),
)
