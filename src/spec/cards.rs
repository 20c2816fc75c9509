//! GPUs by name, for `vram_limit = "rtx4060"` and the `card` grid axis: the memory capacity
//! of each, from the vendor's specification page. Capacity is all a card name stands for:
//! the run happens on the real GPU, with its speed and power.
//!
//! Sizes are the vendor's "GB", which for GDDR and HBM parts are binary gibibytes (an 8 GB
//! RTX 4060 has 8 GiB of GDDR6); the driver reports a little less as usable.

use serde::{Deserialize, Serialize};

/// A GPU in the shipped table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Card(usize);

/// (name, GiB, source) per card.
const CARDS: &[(&str, u64, &str)] = &[
    (
        "rtx3060-12g",
        12,
        "https://www.nvidia.com/en-us/geforce/graphics-cards/30-series/rtx-3060-3060ti/",
    ),
    (
        "rtx3060-8g",
        8,
        "https://www.nvidia.com/en-us/geforce/graphics-cards/30-series/rtx-3060-3060ti/",
    ),
    (
        "rtx3070",
        8,
        "https://www.nvidia.com/en-us/geforce/graphics-cards/30-series/rtx-3070-3070ti/",
    ),
    (
        "rtx3080",
        10,
        "https://www.nvidia.com/en-us/geforce/graphics-cards/30-series/rtx-3080-3080ti/",
    ),
    (
        "rtx3090",
        24,
        "https://www.nvidia.com/en-us/geforce/graphics-cards/30-series/rtx-3090-3090ti/",
    ),
    (
        "rtx4060",
        8,
        "https://www.nvidia.com/en-us/geforce/graphics-cards/40-series/rtx-4060-4060ti/",
    ),
    (
        "rtx4060ti-16g",
        16,
        "https://www.nvidia.com/en-us/geforce/graphics-cards/40-series/rtx-4060-4060ti/",
    ),
    (
        "rtx4070",
        12,
        "https://www.nvidia.com/en-us/geforce/graphics-cards/40-series/rtx-4070-family/",
    ),
    (
        "rtx4080",
        16,
        "https://www.nvidia.com/en-us/geforce/graphics-cards/40-series/rtx-4080-family/",
    ),
    (
        "rtx4090",
        24,
        "https://www.nvidia.com/en-us/geforce/graphics-cards/40-series/rtx-4090/",
    ),
    (
        "rtx5090",
        32,
        "https://www.nvidia.com/en-us/geforce/graphics-cards/50-series/rtx-5090/",
    ),
    (
        "t4",
        16,
        "https://www.nvidia.com/en-us/data-center/tesla-t4/",
    ),
    ("a10g", 24, "https://aws.amazon.com/ec2/instance-types/g5/"),
    ("l4", 24, "https://www.nvidia.com/en-us/data-center/l4/"),
    (
        "a100-40g",
        40,
        "https://www.nvidia.com/en-us/data-center/a100/",
    ),
    (
        "a100-80g",
        80,
        "https://www.nvidia.com/en-us/data-center/a100/",
    ),
    (
        "h100-80g",
        80,
        "https://www.nvidia.com/en-us/data-center/h100/",
    ),
    (
        "h200",
        141,
        "https://www.nvidia.com/en-us/data-center/h200/",
    ),
];

impl Card {
    /// Every card in the table, in table order.
    pub fn all() -> impl Iterator<Item = Card> {
        (0..CARDS.len()).map(Card)
    }

    /// The card called `name` (exact, lower case), else `None`.
    pub fn parse(name: &str) -> Option<Card> {
        CARDS.iter().position(|(n, _, _)| *n == name).map(Card)
    }

    /// Its name, as written in profiles.
    pub fn name(self) -> &'static str {
        CARDS[self.0].0
    }

    /// Memory capacity, bytes.
    pub fn bytes(self) -> u64 {
        CARDS[self.0].1 << 30
    }

    /// Where the capacity comes from.
    pub fn source(self) -> &'static str {
        CARDS[self.0].2
    }

    /// The names, as a phrase for error messages.
    pub fn expected() -> String {
        CARDS
            .iter()
            .map(|(n, _, _)| *n)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl std::fmt::Display for Card {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl TryFrom<String> for Card {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Card::parse(&s).ok_or_else(|| format!("unknown card `{s}` (known: {})", Card::expected()))
    }
}

impl From<Card> for String {
    fn from(c: Card) -> String {
        c.name().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_sizes_are_binary() {
        let c = Card::parse("rtx4060").unwrap();
        assert_eq!(c.bytes(), 8 << 30);
        assert_eq!(c.to_string(), "rtx4060");
        assert_eq!(Card::parse("a100-40g").unwrap().bytes(), 40 << 30);
        assert!(Card::parse("RTX 4060").is_none());
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(json, "\"rtx4060\"");
        assert_eq!(serde_json::from_str::<Card>(&json).unwrap(), c);
        assert!(serde_json::from_str::<Card>("\"gtx280\"").is_err());
        let names: std::collections::HashSet<_> = Card::all().map(Card::name).collect();
        assert_eq!(names.len(), CARDS.len(), "names are unique");
    }
}
