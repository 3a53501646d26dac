//! Strategies for the property tests of every parser that reads input from
//! outside sandcast (feature `testing`): JSON built from a vocabulary of
//! field names and tags, so generated documents reach past the first
//! `match` of the types under test, and byte-level mutations of real input.
//!
//! Each property test runs proptest's default of 256 cases, or
//! `PROPTEST_CASES`; inputs are bounded in size here, so a run's time is
//! bounded by the case count.

use proptest::prelude::*;
use serde_json::Value;

/// Numbers that sit on or next to a limit somewhere in sandcast.
const EDGE_NUMBERS: &[i64] = &[
    -1,
    0,
    1,
    199,
    200,
    239,
    240,
    319,
    320,
    2160,
    2161,
    3840,
    3841,
    16_384,
    16_385,
    -16_384,
    -16_385,
    65_536,
    86_400,
    86_401,
    i32::MIN as i64,
    i32::MAX as i64,
    u32::MAX as i64,
    u32::MAX as i64 + 1,
    i64::MIN,
    i64::MAX,
];

/// A string: mostly a word of `words`, else short printable text, else any
/// Unicode, else long runs (limits on length).
pub fn json_string(words: &'static [&'static str]) -> BoxedStrategy<String> {
    prop_oneof![
        4 => prop::sample::select(words).prop_map(str::to_owned),
        2 => "[ -~]{0,24}",
        1 => any::<String>(),
        1 => (prop::sample::select(words), 0usize..70_000)
            .prop_map(|(w, n)| w.repeat(n / w.len().max(1) + 1)),
    ]
    .boxed()
}

/// Any JSON value, up to four levels deep, whose keys and strings are mostly
/// words of `words` and whose numbers are often edge values.
pub fn json_value(words: &'static [&'static str]) -> BoxedStrategy<Value> {
    let number = prop_oneof![
        2 => prop::sample::select(EDGE_NUMBERS).prop_map(Value::from),
        2 => (-20_000i64..20_000).prop_map(Value::from),
        1 => any::<i64>().prop_map(Value::from),
        1 => any::<u64>().prop_map(Value::from),
        1 => any::<f64>().prop_map(Value::from),
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        number,
        json_string(words).prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((prop::sample::select(words), inner), 0..10).prop_map(|kv| {
                Value::Object(kv.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
            }),
        ]
    })
    .boxed()
}

/// A JSON object that has `tag_key` set to one of `tags`, with other fields
/// from `words`: the shape of every tagged message sandcast reads.
pub fn tagged_object(
    tag_key: &'static str,
    tags: &'static [&'static str],
    words: &'static [&'static str],
) -> BoxedStrategy<Value> {
    (
        prop::sample::select(tags),
        prop::collection::vec((prop::sample::select(words), json_value(words)), 0..8),
    )
        .prop_map(move |(tag, fields)| {
            let mut map: serde_json::Map<String, Value> =
                fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
            map.insert(tag_key.to_owned(), Value::String(tag.to_owned()));
            Value::Object(map)
        })
        .boxed()
}

/// One edit of a byte string; positions are taken modulo the length.
#[derive(Debug, Clone)]
pub enum Edit {
    /// Overwrite the byte at a position.
    Replace(usize, u8),
    /// Insert a byte at a position.
    Insert(usize, u8),
    /// Remove up to this many bytes from a position.
    Delete(usize, usize),
    /// Repeat up to this many bytes from a position this many times.
    Repeat(usize, usize, usize),
}

/// Up to eight edits; [`apply_edits`] carries them out.
pub fn edits() -> BoxedStrategy<Vec<Edit>> {
    let edit = prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Replace(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Insert(i, b)),
        (any::<usize>(), 1usize..200).prop_map(|(i, n)| Edit::Delete(i, n)),
        (any::<usize>(), 1usize..200, 1usize..50).prop_map(|(i, n, k)| Edit::Repeat(i, n, k)),
    ];
    prop::collection::vec(edit, 0..8).boxed()
}

/// `base` with `edits` applied in order.
pub fn apply_edits(base: &[u8], edits: &[Edit]) -> Vec<u8> {
    edit_items(base, edits, |b, _| b)
}

/// `base` with `edits` applied to its items; `item(b, now)` is the item an
/// edit with byte `b` writes, given the items as they are now.
fn edit_items<T: Clone>(base: &[T], edits: &[Edit], item: impl Fn(u8, &[T]) -> T) -> Vec<T> {
    let mut out = base.to_vec();
    for edit in edits {
        // Positions index the items as they are now, the end included.
        let at = |i: usize, len: usize| i % (len + 1);
        match *edit {
            Edit::Replace(i, b) if !out.is_empty() => {
                let p = i % out.len();
                out[p] = item(b, &out);
            }
            Edit::Replace(..) => {}
            Edit::Insert(i, b) => {
                let p = at(i, out.len());
                let new = item(b, &out);
                out.insert(p, new);
            }
            Edit::Delete(i, n) => {
                let p = at(i, out.len());
                let end = (p + n).min(out.len());
                out.drain(p..end);
            }
            Edit::Repeat(i, n, k) => {
                let p = at(i, out.len());
                let end = (p + n).min(out.len());
                let piece = out[p..end].to_vec();
                let tail = out.split_off(end);
                for _ in 0..k {
                    out.extend_from_slice(&piece);
                }
                out.extend_from_slice(&tail);
            }
        }
    }
    out
}

/// `base` with up to eight random byte edits.
pub fn mutated(base: Vec<u8>) -> BoxedStrategy<Vec<u8>> {
    edits().prop_map(move |e| apply_edits(&base, &e)).boxed()
}

/// `base` with up to eight edits of whole lines: lines removed, repeated,
/// or overwritten with or inserted as a copy of another line.
pub fn mutated_lines(base: &str) -> BoxedStrategy<String> {
    let lines: Vec<String> = base.split_inclusive('\n').map(str::to_owned).collect();
    edits()
        .prop_map(move |e| {
            edit_items(&lines, &e, |b, now| {
                now.get(usize::from(b) % now.len().max(1))
                    .cloned()
                    .unwrap_or_default()
            })
            .concat()
        })
        .boxed()
}

/// Up to `max_cuts` positions at which to cut a byte stream into reads
/// (taken modulo its length, see [`split_at`]).
pub fn cuts(max_cuts: usize) -> BoxedStrategy<Vec<usize>> {
    prop::collection::vec(any::<usize>(), 0..max_cuts).boxed()
}

/// `data` in consecutive pieces, cut at `cuts`.
pub fn split_at<'a>(data: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut at: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
    at.push(0);
    at.push(data.len());
    at.sort_unstable();
    at.dedup();
    at.windows(2).map(|w| &data[w[0]..w[1]]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edits_apply_at_the_ends_too() {
        let base = b"abc";
        assert_eq!(apply_edits(base, &[Edit::Insert(3, b'!')]), b"abc!");
        assert_eq!(apply_edits(base, &[Edit::Insert(4, b'!')]), b"!abc");
        assert_eq!(apply_edits(base, &[Edit::Delete(0, 2)]), b"c");
        assert_eq!(apply_edits(base, &[Edit::Delete(2, 200)]), b"ab");
        assert_eq!(apply_edits(base, &[Edit::Repeat(0, 1, 3)]), b"aaaabc");
        assert_eq!(apply_edits(base, &[Edit::Replace(5, b'x')]), b"abx");
        assert_eq!(apply_edits(b"", &[Edit::Replace(0, b'x')]), b"");
    }

    #[test]
    fn splits_cover_the_data_in_order() {
        let data = b"0123456789";
        let parts = split_at(data, &[7, 3, 3, 0, 10]);
        assert_eq!(parts, [&b"012"[..], b"3456", b"789"]);
        assert_eq!(split_at(b"", &[5]).concat(), b"");
    }
}
