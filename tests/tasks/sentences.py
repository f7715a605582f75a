"""Plain English sentences for the translation tests (apertium round-trips them)."""

EN = [
    "The old library in the town centre opens at nine o'clock every morning.",
    "Farmers in the valley grow apples, pears and plums on small family plots.",
    "She wrote a long letter to her brother, who lives on the other side of the ocean.",
    "The train to the capital was delayed because of heavy snow on the tracks.",
    "Children learn to read faster when their parents read stories to them at night.",
    "The committee will publish its report on water quality next week.",
    "Our neighbours painted their kitchen yellow and bought a new table.",
    "Scientists measured the temperature of the lake every day for a year.",
]
