//! Fuzzes the head rewriter the agent runs over an upstream's response
//! bytes to add `Alt-Svc` (`edge_proto::alt_svc`).
//!
//! Invariants: nothing panics; splitting the input anywhere gives the same
//! output as one push; the output is the input unchanged, or (outcome
//! `Added`) the input with exactly the header line inserted once.
#![no_main]

use edge_proto::alt_svc::{h3_header, HeadInjector, Outcome};
use libfuzzer_sys::fuzz_target;

fn run(parts: &[&[u8]]) -> (Vec<u8>, Outcome) {
    let mut injector = HeadInjector::new(h3_header(443));
    let mut out = Vec::new();
    for part in parts {
        injector.push(part, &mut out);
    }
    injector.finish(&mut out);
    (out, injector.outcome())
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, input)) = data.split_first() else { return };
    let whole = run(&[input]);
    let at = (split as usize * input.len()) / 255;
    assert_eq!(run(&[&input[..at], &input[at..]]), whole, "split at {at}");
    let (out, outcome) = whole;
    let line = h3_header(443);
    if outcome == Outcome::Added {
        assert_eq!(out.len(), input.len() + line.len());
        // `out` is `input` with `line` inserted at some k: out[..k] and
        // out[k + len..] match input around k (the input may hold the line
        // too, so look for k among the places prefix and suffix allow).
        let prefix = out.iter().zip(input).take_while(|(a, b)| a == b).count();
        let suffix = out.iter().rev().zip(input.iter().rev()).take_while(|(a, b)| a == b).count();
        let from = input.len().saturating_sub(suffix);
        let inserted = (from..=prefix.min(input.len())).any(|k| out[k..k + line.len()] == line[..]);
        assert!(inserted, "the output is the input with only the line added");
    } else {
        assert_eq!(out, input, "passed through unchanged ({outcome:?})");
    }
});
