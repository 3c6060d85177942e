//! Stage 2's scorer: exact MaxSim of one query against many candidate multi-vectors.
//!
//! The naive score (`MultiVector::maxsim`) takes one dot product at a time. Here the query is
//! transposed once into blocks of `LANES` rows, so one pass over a document row updates the
//! dot products of `LANES` query rows at once (one SIMD register), and `DOC_ROWS` document rows
//! are taken together so their independent sums keep the FP units busy. Each dot product is
//! still a sequential sum over the 128 components, with a separate multiply and add (Rust never
//! fuses them), so every score is bit-for-bit the naive one: vectorised across query rows, never
//! across the summation. On x86-64 with AVX2 the tile is written with intrinsics (left to
//! itself, LLVM vectorised across document rows with shuffles and ran slower than the naive
//! loop); elsewhere a portable version of the same arithmetic runs.

use rayon::prelude::*;

use crate::types::MultiVector;

/// Query rows scored together: one 256-bit register of f32 (two NEON registers on arm64).
const LANES: usize = 8;
/// Document rows scored together: 8 independent accumulators hide the add latency.
const DOC_ROWS: usize = 8;

type Lanes = [f32; LANES];

/// A query laid out for the kernel; build it once, score any number of documents with it.
#[derive(Debug, Clone)]
pub struct PreparedQuery {
    rows: usize,
    dim: usize,
    /// `blocks[b * dim + k][l]` = component `k` of query row `b * LANES + l`; rows past the end
    /// are zero, and their scores are dropped.
    blocks: Vec<Lanes>,
}

impl PreparedQuery {
    pub fn new(query: &MultiVector) -> PreparedQuery {
        let n_blocks = query.rows.div_ceil(LANES);
        let dim = query.dim;
        let mut blocks = vec![[0f32; LANES]; n_blocks * dim];
        for q in 0..query.rows {
            let (b, l) = (q / LANES, q % LANES);
            for (k, v) in query.row(q).iter().enumerate() {
                blocks[b * dim + k][l] = *v;
            }
        }
        PreparedQuery {
            rows: query.rows,
            dim,
            blocks,
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// MaxSim of the query against one document: Σ over query rows of the max dot product over
    /// the document's rows. Equal, bit for bit, to `query.maxsim(doc)`.
    pub fn score(&self, doc: &MultiVector) -> f32 {
        assert_eq!(
            self.dim, doc.dim,
            "maxsim of multivectors of different widths"
        );
        self.score_rows(&doc.data)
    }

    /// Same as [`score`](Self::score) on a row-major slice of `n × dim` floats.
    pub fn score_rows(&self, doc: &[f32]) -> f32 {
        assert!(
            self.dim > 0 && doc.len() % self.dim == 0,
            "document of {} floats is not a whole number of {}-wide rows",
            doc.len(),
            self.dim
        );
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU has just been checked for AVX2.
                return unsafe { self.score_avx2(doc) };
            }
        }
        self.score_portable(doc)
    }

    /// Scores many documents, spread over the rayon pool.
    pub fn score_many(&self, docs: &[MultiVector]) -> Vec<f32> {
        docs.par_iter().map(|d| self.score(d)).collect()
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn score_avx2(&self, doc: &[f32]) -> f32 {
        use std::arch::x86_64::*;
        let dim = self.dim;
        let n_doc = doc.len() / dim;
        let full = n_doc / DOC_ROWS * DOC_ROWS;
        let mut best_per_query = vec![f32::NEG_INFINITY; self.blocks.len() / dim * LANES];
        for (b, qt) in self.blocks.chunks_exact(dim).enumerate() {
            let mut best = _mm256_set1_ps(f32::NEG_INFINITY);
            for tile_rows in doc[..full * dim].chunks_exact(DOC_ROWS * dim) {
                avx2::tile::<DOC_ROWS>(qt, tile_rows, &mut best);
            }
            for row in doc[full * dim..].chunks_exact(dim) {
                avx2::tile::<1>(qt, row, &mut best);
            }
            _mm256_storeu_ps(best_per_query[b * LANES..].as_mut_ptr(), best);
        }
        best_per_query[..self.rows].iter().sum()
    }

    #[inline(always)]
    fn score_portable(&self, doc: &[f32]) -> f32 {
        let dim = self.dim;
        let n_doc = doc.len() / dim;
        let mut best_per_query = vec![f32::NEG_INFINITY; self.blocks.len() / dim.max(1) * LANES];
        for (b, qt) in self.blocks.chunks_exact(dim).enumerate() {
            let mut best = [f32::NEG_INFINITY; LANES];
            let full = n_doc / DOC_ROWS * DOC_ROWS;
            for tile_rows in doc[..full * dim].chunks_exact(DOC_ROWS * dim) {
                tile::<DOC_ROWS>(qt, tile_rows, &mut best);
            }
            for row in doc[full * dim..].chunks_exact(dim) {
                tile::<1>(qt, row, &mut best);
            }
            best_per_query[b * LANES..(b + 1) * LANES].copy_from_slice(&best);
        }
        // Summed in query order, like the naive score.
        best_per_query[..self.rows].iter().sum()
    }
}

/// Dot products of `R` document rows with one block of query rows, folded into `best` (the
/// running max per query row).
#[inline(always)]
fn tile<const R: usize>(qt: &[Lanes], rows: &[f32], best: &mut Lanes) {
    let dim = qt.len();
    assert_eq!(rows.len(), R * dim, "tile of {R} rows of {dim}");
    // -0.0 is the start of an f32 `sum()`: the first product comes out exact.
    let mut acc = [[-0.0f32; LANES]; R];
    for (k, q) in qt.iter().enumerate() {
        // SAFETY: r < R and k < dim, and rows holds R × dim floats (checked above).
        let d: [f32; R] = std::array::from_fn(|r| unsafe { *rows.get_unchecked(r * dim + k) });
        for r in 0..R {
            for l in 0..LANES {
                acc[r][l] += q[l] * d[r];
            }
        }
    }
    for a in &acc {
        for l in 0..LANES {
            // Not `f32::max`: this lowers to one max instruction (scores are never NaN).
            best[l] = if a[l] > best[l] { a[l] } else { best[l] };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Lanes, LANES};
    use std::arch::x86_64::*;

    /// The AVX2 tile: one register holds the `LANES` query rows' running dot products with one
    /// document row; `R` registers for `R` document rows.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn tile<const R: usize>(qt: &[Lanes], rows: &[f32], best: &mut __m256) {
        const _: () = assert!(LANES == 8, "one __m256 holds 8 f32");
        let dim = qt.len();
        assert_eq!(rows.len(), R * dim, "tile of {R} rows of {dim}");
        let mut acc = [_mm256_set1_ps(-0.0); R];
        let rows = rows.as_ptr();
        for (k, q) in qt.iter().enumerate() {
            // SAFETY: a Lanes is 8 contiguous f32 (unaligned load).
            let q = unsafe { _mm256_loadu_ps(q.as_ptr()) };
            for (r, a) in acc.iter_mut().enumerate() {
                // SAFETY: r < R and k < dim, and rows holds R × dim floats (checked above).
                let d = unsafe { _mm256_broadcast_ss(&*rows.add(r * dim + k)) };
                // Multiply, then add: two roundings, like the naive loop (no FMA).
                *a = _mm256_add_ps(*a, _mm256_mul_ps(q, d));
            }
        }
        for a in acc {
            *best = _mm256_max_ps(a, *best);
        }
    }
}

/// Scores with the naive loop, for comparisons.
pub fn score_naive(query: &MultiVector, docs: &[MultiVector]) -> Vec<f32> {
    docs.iter().map(|d| query.maxsim(d)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random(rng: &mut impl Rng, rows: usize, dim: usize) -> MultiVector {
        let data = (0..rows * dim)
            .map(|_| rng.gen_range(-1.0f32..1.0))
            .collect();
        MultiVector::new(rows, dim, data)
    }

    #[test]
    fn equals_the_naive_score_bit_for_bit() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        // Shapes around every block edge: query rows and doc rows not multiples of the blocks.
        for &(nq, nd, dim) in &[
            (1, 1, 128),
            (7, 9, 128),
            (8, 8, 128),
            (9, 17, 128),
            (20, 1030, 128),
            (25, 63, 128),
            (3, 5, 3),
        ] {
            let q = random(&mut rng, nq, dim);
            let prepared = PreparedQuery::new(&q);
            for _ in 0..3 {
                let d = random(&mut rng, nd, dim);
                let fast = prepared.score(&d);
                let naive = q.maxsim(&d);
                assert_eq!(
                    fast.to_bits(),
                    naive.to_bits(),
                    "query {nq}x{dim} doc {nd}x{dim}: kernel {fast} naive {naive}"
                );
            }
        }
    }

    #[test]
    fn portable_path_equals_the_naive_score() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let q = random(&mut rng, 20, 128);
        let d = random(&mut rng, 100, 128);
        let prepared = PreparedQuery::new(&q);
        assert_eq!(
            prepared.score_portable(&d.data).to_bits(),
            q.maxsim(&d).to_bits()
        );
    }

    #[test]
    fn many_documents_in_parallel_keep_their_order() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let q = random(&mut rng, 20, 128);
        let docs: Vec<_> = (0..40).map(|i| random(&mut rng, 50 + i * 7, 128)).collect();
        let fast = PreparedQuery::new(&q).score_many(&docs);
        assert_eq!(fast, score_naive(&q, &docs));
    }

    #[test]
    fn empty_document_scores_like_the_naive_loop() {
        let q = MultiVector::new(2, 4, vec![1.0; 8]);
        let d = MultiVector::new(0, 4, vec![]);
        assert_eq!(PreparedQuery::new(&q).score(&d), q.maxsim(&d));
    }
}
