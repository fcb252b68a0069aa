//! Which photos of a release a run downloads, and which of them are held out for testing.
//!
//! Every choice is a pure function of the release and the parameters. Held-out photos are
//! decided first and independently of `limit`; the training photos are then the first `limit`
//! of a fixed order with the held-out ones removed. So raising `limit` by one adds exactly one
//! photo and changes nothing else (the selection is prefix-stable), and the held-out set stays
//! put. The random order ranks each id by a keyed hash of (seed, id): it does not depend on
//! shard or row order, and a release that gains or loses photos keeps the relative order of the
//! rest.

use std::collections::{HashMap, HashSet};

use sdpipe_stages::params::KindParams;
use serde::Deserialize;

use super::tsv::Photo;

/// The alphabet and length of a photo id we accept as a file name.
pub fn is_safe_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sample {
    /// Release order: shard by shard, row by row.
    First,
    /// Seeded hash order.
    Random,
}

impl Sample {
    /// The `sample` parameter's values.
    pub const NAMES: &'static [&'static str] = &["first", "random"];
}

/// The selection parameters of the kind.
#[derive(Debug, Clone, KindParams)]
pub struct Spec {
    /// Number of training photos to select (unless `ids` is given); failed downloads are not
    /// replaced, so `photos.jsonl` may hold fewer.
    #[param(default = 100, min = 1)]
    pub limit: usize,
    /// `first`: release order; `random`: an order seeded by `seed`. Either way a larger `limit`
    /// extends a smaller one.
    #[param(default = "first", one_of = Sample::NAMES)]
    pub sample: Sample,
    /// Seed of the `random` order and of the `test_count` draw.
    #[param(default = 0)]
    pub seed: i64,
    /// Explicit training photo ids, in order; when not empty, `limit` and `sample` are not
    /// used. Unknown ids are an error.
    #[param(default = [])]
    pub ids: Vec<String>,
    /// Photo ids to hold out (`split: test`), downloaded besides the training ones.
    #[param(default = [])]
    pub test: Vec<String>,
    /// How many more held-out photos to draw with `seed` (none of them training).
    #[param(default = 0, min = 0)]
    pub test_count: usize,
}

/// Indices into the release's photos.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    pub train: Vec<usize>,
    pub test: Vec<usize>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SelectError {
    #[error("{count} id(s) in `{param}` are not in the release: {examples}")]
    UnknownIds { param: &'static str, count: usize, examples: String },
    #[error("`test_count` is {wanted} but only {available} photos are left to draw from")]
    TooFewForTest { wanted: usize, available: usize },
}

pub fn select(photos: &[Photo], spec: &Spec) -> Result<Selection, SelectError> {
    let position: HashMap<&str, usize> =
        photos.iter().enumerate().map(|(i, p)| (p.id(), i)).collect();
    let lookup = |param: &'static str, ids: &[String]| -> Result<Vec<usize>, SelectError> {
        let missing: Vec<&str> = ids
            .iter()
            .filter(|id| !position.contains_key(id.as_str()))
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            let mut examples = missing.iter().take(5).map(|m| format!("`{m}`")).collect::<Vec<_>>();
            if missing.len() > 5 {
                examples.push("...".into());
            }
            return Err(SelectError::UnknownIds {
                param,
                count: missing.len(),
                examples: examples.join(", "),
            });
        }
        let mut seen = HashSet::new();
        Ok(ids.iter().map(|id| position[id.as_str()]).filter(|i| seen.insert(*i)).collect())
    };
    let explicit_train = lookup("ids", &spec.ids)?;
    let mut test = lookup("test", &spec.test)?;

    // Draw `test_count` more held-out photos from those not already spoken for.
    let taken: HashSet<usize> = test.iter().chain(&explicit_train).copied().collect();
    let mut pool: Vec<usize> = (0..photos.len()).filter(|i| !taken.contains(i)).collect();
    if spec.test_count > pool.len() {
        return Err(SelectError::TooFewForTest { wanted: spec.test_count, available: pool.len() });
    }
    sort_by_rank(&mut pool, photos, spec.seed, b"test");
    test.extend(pool.into_iter().take(spec.test_count));

    let held_out: HashSet<usize> = test.iter().copied().collect();
    let train = if spec.ids.is_empty() {
        let mut order: Vec<usize> = (0..photos.len()).collect();
        if spec.sample == Sample::Random {
            sort_by_rank(&mut order, photos, spec.seed, b"train");
        }
        order.into_iter().filter(|i| !held_out.contains(i)).take(spec.limit).collect()
    } else {
        explicit_train.into_iter().filter(|i| !held_out.contains(i)).collect()
    };
    Ok(Selection { train, test })
}

/// Order by blake3(purpose, seed, id): uniform, version-stable, independent of row order.
fn sort_by_rank(indices: &mut [usize], photos: &[Photo], seed: i64, purpose: &[u8]) {
    let rank = |i: &usize| {
        let mut hasher = blake3::Hasher::new();
        hasher.update(purpose);
        hasher.update(&seed.to_le_bytes());
        hasher.update(photos[*i].id().as_bytes());
        *hasher.finalize().as_bytes()
    };
    indices.sort_by_cached_key(rank);
}

#[cfg(test)]
mod tests {
    use super::super::tsv;
    use super::*;

    fn photos(n: usize) -> Vec<Photo> {
        let mut text = String::from("photo_id\tphoto_image_url\n");
        for i in 0..n {
            text.push_str(&format!("p{i:03}\thttps://i/{i}\n"));
        }
        tsv::parse("photos.tsv000", text.as_bytes()).unwrap().photos
    }

    fn spec(limit: usize, sample: Sample, seed: i64) -> Spec {
        Spec { limit, sample, seed, ids: vec![], test: vec![], test_count: 0 }
    }

    fn ids(photos: &[Photo], indices: &[usize]) -> Vec<String> {
        indices.iter().map(|i| photos[*i].id().to_string()).collect()
    }

    #[test]
    fn safe_ids_are_short_and_from_a_file_name_alphabet() {
        for ok in ["Dwu85P9SOIk", "a-b_c", "x", &"a".repeat(64)] {
            assert!(is_safe_id(ok), "{ok}");
        }
        for bad in ["", "../etc", "a/b", "a.jpg", "ä", "a b", &"a".repeat(65), ".."] {
            assert!(!is_safe_id(bad), "{bad}");
        }
    }

    #[test]
    fn first_takes_release_order() {
        let p = photos(10);
        let s = select(&p, &spec(3, Sample::First, 0)).unwrap();
        assert_eq!(ids(&p, &s.train), ["p000", "p001", "p002"]);
        assert!(s.test.is_empty());
    }

    #[test]
    fn random_is_deterministic_and_seeded() {
        let p = photos(50);
        let a = select(&p, &spec(10, Sample::Random, 1)).unwrap();
        assert_eq!(a, select(&p, &spec(10, Sample::Random, 1)).unwrap());
        assert_ne!(a, select(&p, &spec(10, Sample::Random, 2)).unwrap());
        assert_ne!(a.train, (0..10).collect::<Vec<_>>(), "not release order");
    }

    #[test]
    fn selection_is_prefix_stable_in_limit() {
        let p = photos(40);
        for sample in [Sample::First, Sample::Random] {
            for test_count in [0, 3] {
                let mut previous: Option<Selection> = None;
                for limit in 1..=30 {
                    let s = select(&p, &Spec { test_count, ..spec(limit, sample, 7) }).unwrap();
                    if let Some(prev) = previous {
                        assert_eq!(s.train[..limit - 1], prev.train[..], "{sample:?} {limit}");
                        assert_eq!(s.test, prev.test);
                    }
                    assert_eq!(s.train.len(), limit);
                    previous = Some(s);
                }
            }
        }
    }

    #[test]
    fn random_order_does_not_depend_on_row_order() {
        let p = photos(30);
        let mut reversed = p.clone();
        reversed.reverse();
        let a = select(&p, &spec(5, Sample::Random, 3)).unwrap();
        let b = select(&reversed, &spec(5, Sample::Random, 3)).unwrap();
        assert_eq!(ids(&p, &a.train), ids(&reversed, &b.train));
    }

    #[test]
    fn held_out_photos_are_disjoint_from_training() {
        let p = photos(30);
        let s = Spec { test: vec!["p002".into()], test_count: 4, ..spec(20, Sample::First, 5) };
        let s = select(&p, &s).unwrap();
        assert_eq!(s.test.len(), 5);
        assert_eq!(s.test[0], 2, "explicit test ids come first");
        assert_eq!(s.train.len(), 20);
        assert!(s.train.iter().all(|i| !s.test.contains(i)));
    }

    #[test]
    fn explicit_ids_are_taken_in_their_order() {
        let p = photos(10);
        let s = Spec {
            ids: vec!["p007".into(), "p003".into(), "p007".into()],
            test: vec!["p001".into()],
            ..spec(1, Sample::First, 0)
        };
        let s = select(&p, &s).unwrap();
        assert_eq!(ids(&p, &s.train), ["p007", "p003"]);
        assert_eq!(ids(&p, &s.test), ["p001"]);
    }

    #[test]
    fn unknown_ids_are_an_error_naming_them() {
        let p = photos(3);
        let s = Spec { ids: vec!["p000".into(), "nope".into()], ..spec(1, Sample::First, 0) };
        assert_eq!(
            select(&p, &s).unwrap_err().to_string(),
            "1 id(s) in `ids` are not in the release: `nope`"
        );
        let s = Spec { test_count: 4, ..spec(1, Sample::First, 0) };
        assert_eq!(
            select(&p, &s).unwrap_err(),
            SelectError::TooFewForTest { wanted: 4, available: 3 }
        );
    }
}
