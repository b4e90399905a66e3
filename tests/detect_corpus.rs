//! The detectors against a labelled corpus generated here from a fixed seed: PII of every layout users write, in
//! mixed text, and non-PII strings of the same shapes (UUIDs, order ids, timestamps, prices, version strings, URLs
//! without addresses, Luhn-invalid digit runs). Prints precision and recall per detector; fails when recall on
//! e-mails, cards, IBANs, SSNs or E.164 phones is under 99% or false positives are over 0.1%.

use std::collections::BTreeMap;

use piiwall::detect::{Detectors, Found, Kind};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

const PER_KIND: usize = 5_000;

/// Makes one labelled value of a kind.
type Generator = fn(&mut StdRng) -> String;
const NEGATIVES: usize = 50_000;

fn digits(rng: &mut StdRng, n: usize) -> String {
    (0..n).map(|_| char::from(b'0' + rng.gen_range(0..10))).collect()
}

fn luhn_check_digit(body: &str) -> u8 {
    let sum: u32 = body
        .bytes()
        .rev()
        .enumerate()
        .map(|(i, b)| {
            let d = u32::from(b - b'0');
            if i % 2 == 0 {
                let x = d * 2;
                if x > 9 { x - 9 } else { x }
            } else {
                d
            }
        })
        .sum();
    ((10 - sum % 10) % 10) as u8
}

/// A card number of a real issuer range, written whole, in fours with spaces or dashes (Amex 4-6-5).
fn card(rng: &mut StdRng) -> String {
    let (prefix, length) = *[
        ("4", 16),
        ("4", 13),
        ("51", 16),
        ("55", 16),
        ("2221", 16),
        ("2720", 16),
        ("34", 15),
        ("37", 15),
        ("6011", 16),
        ("65", 16),
        ("3530", 16),
        ("62", 16),
        ("36", 14),
    ]
    .choose(rng)
    .unwrap();
    let mut number = format!("{prefix}{}", digits(rng, length - prefix.len() - 1));
    number.push(char::from(b'0' + luhn_check_digit(&number)));
    let groups: Vec<&str> = if length == 15 {
        vec![&number[..4], &number[4..10], &number[10..]]
    } else {
        number
            .as_bytes()
            .chunks(4)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect()
    };
    match rng.gen_range(0..3) {
        0 => number.clone(),
        1 => groups.join(" "),
        _ => groups.join("-"),
    }
}

fn iban(rng: &mut StdRng) -> String {
    let (country, bban): (&str, String) = match rng.gen_range(0..5) {
        0 => ("DE", digits(rng, 18)),
        1 => ("FR", format!("{}{}", digits(rng, 20), digits(rng, 3))),
        2 => ("NL", format!("ABNA{}", digits(rng, 10))),
        3 => ("GB", format!("NWBK{}", digits(rng, 14))),
        _ => ("ES", digits(rng, 20)),
    };
    let rearranged: String = format!("{bban}{country}00")
        .chars()
        .map(|c| match c {
            'A'..='Z' => (c as u32 - 'A' as u32 + 10).to_string(),
            c => c.to_string(),
        })
        .collect();
    let rest = rearranged
        .bytes()
        .fold(0u32, |r, b| (r * 10 + u32::from(b - b'0')) % 97);
    let whole = format!("{country}{:02}{bban}", 98 - rest);
    if rng.gen_bool(0.5) {
        whole
    } else {
        whole
            .as_bytes()
            .chunks(4)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect::<Vec<_>>()
            .join(" ")
    }
}

fn ssn(rng: &mut StdRng) -> String {
    let area = loop {
        let a = rng.gen_range(1..900);
        if a != 666 {
            break a;
        }
    };
    format!("{area:03}-{:02}-{:04}", rng.gen_range(1..100), rng.gen_range(1..10_000))
}

fn e164(rng: &mut StdRng) -> String {
    let (cc, rest) = *[
        ("1", 10),
        ("44", 10),
        ("33", 9),
        ("49", 11),
        ("91", 10),
        ("61", 9),
        ("81", 10),
    ]
    .choose(rng)
    .unwrap();
    let national = format!("{}{}", rng.gen_range(2..10), digits(rng, rest - 1));
    match rng.gen_range(0..3) {
        0 => format!("+{cc}{national}"),
        1 => format!(
            "+{cc} {}",
            national
                .as_bytes()
                .chunks(3)
                .map(|c| std::str::from_utf8(c).unwrap())
                .collect::<Vec<_>>()
                .join(" ")
        ),
        _ => format!("+{cc}-{}-{}", &national[..3], &national[3..]),
    }
}

fn email(rng: &mut StdRng) -> String {
    let names = ["ann", "bob.lee", "c_d", "eve+news", "f-g", "hal9000", "j.o.e"];
    let domains = [
        "example.com",
        "mail.example.org",
        "sub.example.co.uk",
        "corp-mail.example.io",
    ];
    format!(
        "{}{}@{}",
        names.choose(rng).unwrap(),
        rng.gen_range(0..1000),
        domains.choose(rng).unwrap()
    )
}

fn in_text(rng: &mut StdRng, value: &str) -> (String, usize) {
    let (before, after) = *[
        ("", ""),
        ("Contact: ", ""),
        ("please use ", " from now on."),
        ("(", ")"),
        ("note: value=", "; thanks"),
        ("\"", "\" was given"),
        ("Order 1234 paid by ", ", shipped 2024-05-06."),
    ]
    .choose(rng)
    .unwrap();
    (format!("{before}{value}{after}"), before.len())
}

fn negative(rng: &mut StdRng) -> String {
    match rng.gen_range(0..9) {
        0 => format!(
            "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
            rng.r#gen::<u32>(),
            rng.r#gen::<u16>(),
            rng.r#gen::<u16>(),
            rng.r#gen::<u16>(),
            rng.r#gen::<u64>() & 0xffff_ffff_ffff
        ),
        1 => format!("ORD-{}-{}", rng.gen_range(2000..2030), digits(rng, 6)),
        2 => format!(
            "2024-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
            rng.gen_range(1..13),
            rng.gen_range(1..29),
            rng.gen_range(0..24),
            rng.gen_range(0..60),
            rng.gen_range(0..60),
            rng.gen_range(0..1000)
        ),
        3 => format!("{}", 1_700_000_000_000u64 + rng.gen_range(0..100_000_000_000u64)),
        4 => format!(
            "${},{:03}.{:02}",
            rng.gen_range(1..999),
            rng.gen_range(0..1000),
            rng.gen_range(0..100)
        ),
        5 => format!(
            "v{}.{}.{}",
            rng.gen_range(0..20),
            rng.gen_range(0..50),
            rng.gen_range(0..200)
        ),
        6 => format!(
            "https://shop.example.com/items/{}?ref=abc&page={}",
            digits(rng, 8),
            rng.gen_range(1..50)
        ),
        7 => {
            // A digit run of card length that fails Luhn.
            let mut number = format!("4{}", digits(rng, 14));
            number.push(char::from(b'0' + (luhn_check_digit(&number) + 1) % 10));
            number
        }
        _ => format!(
            "invoice #{} for {} items, total {}.{:02} EUR",
            digits(rng, 7),
            rng.gen_range(1..20),
            rng.gen_range(1..5000),
            rng.gen_range(0..100)
        ),
    }
}

#[test]
fn recall_and_false_positives_on_a_labelled_corpus() {
    let mut rng = StdRng::seed_from_u64(17);
    let detectors = Detectors::all();
    let generators: [(Kind, Generator); 5] = [
        (Kind::Email, email),
        (Kind::Card, card),
        (Kind::Iban, iban),
        (Kind::Ssn, ssn),
        (Kind::Phone, e164),
    ];
    let mut found: Vec<Found> = Vec::new();
    // Per detector: [true positives, false negatives, false positives].
    let mut tally: BTreeMap<Kind, [usize; 3]> = BTreeMap::new();
    for (kind, generate) in generators {
        for _ in 0..PER_KIND {
            let value = generate(&mut rng);
            let (text, at) = in_text(&mut rng, &value);
            detectors.find(&text, &mut found);
            let hit = found
                .iter()
                .any(|f| f.kind == kind && f.start == at && f.end == at + value.len());
            tally.entry(kind).or_default()[usize::from(!hit)] += 1;
            if !hit {
                eprintln!("missed {} in {text:?}", kind.name());
            }
            for f in found.iter().filter(|f| !(f.kind == kind && f.start == at)) {
                tally.entry(f.kind).or_default()[2] += 1;
            }
        }
    }
    let mut false_positives = 0;
    for _ in 0..NEGATIVES {
        let text = negative(&mut rng);
        detectors.find(&text, &mut found);
        for f in &found {
            tally.entry(f.kind).or_default()[2] += 1;
            false_positives += 1;
            eprintln!("false positive {:?} in {text:?}", f.kind);
        }
    }
    println!("detector   recall     precision");
    for (kind, [tp, fn_, fp]) in &tally {
        let recall = *tp as f64 / (tp + fn_).max(1) as f64;
        let precision = *tp as f64 / (tp + fp).max(1) as f64;
        println!(
            "{:<10} {:>8.4}%  {:>8.4}%",
            kind.name(),
            recall * 100.0,
            precision * 100.0
        );
    }
    for (kind, _) in generators {
        let [tp, fn_, _] = tally[&kind];
        assert!(
            tp as f64 >= 0.99 * (tp + fn_) as f64,
            "{} recall {tp}/{}",
            kind.name(),
            tp + fn_
        );
    }
    assert!(
        false_positives as f64 <= 0.001 * NEGATIVES as f64,
        "{false_positives} false positives in {NEGATIVES} non-PII strings"
    );
}
