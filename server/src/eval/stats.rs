//! The statistics of `attune eval`: Wilson score intervals for accuracies, and for two
//! configurations run on the same items, the paired difference with a Wald interval and the
//! exact (binomial) McNemar test on the discordant pairs.

/// The 97.5% quantile of the standard normal: two-sided 95% intervals.
const Z95: f64 = 1.959_963_984_540_054;

/// A 95% interval.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Interval {
    pub low: f64,
    pub high: f64,
}

/// Wilson score 95% interval for `correct` successes out of `n` (good at small n and near 0 or
/// 1, where the normal approximation is not).
pub fn wilson(correct: usize, n: usize) -> Interval {
    if n == 0 {
        return Interval {
            low: 0.0,
            high: 1.0,
        };
    }
    let (k, n) = (correct as f64, n as f64);
    let p = k / n;
    let z2 = Z95 * Z95;
    let denom = 1.0 + z2 / n;
    let center = (p + z2 / (2.0 * n)) / denom;
    let half = Z95 * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt() / denom;
    Interval {
        low: (center - half).max(0.0),
        high: (center + half).min(1.0),
    }
}

/// Two configurations compared on the same items.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Paired {
    /// Items only the baseline got right.
    pub baseline_only: usize,
    /// Items only the other configuration got right.
    pub other_only: usize,
    pub n: usize,
    /// Accuracy of the other configuration minus the baseline's.
    pub difference: f64,
    pub difference_ci: Interval,
    /// Exact two-sided McNemar p-value.
    pub p_value: f64,
}

/// Compares per-item correctness of `other` against `baseline` (same items, same order).
pub fn paired(baseline: &[bool], other: &[bool]) -> Paired {
    assert_eq!(
        baseline.len(),
        other.len(),
        "paired results need the same items"
    );
    let n = baseline.len();
    let b = baseline
        .iter()
        .zip(other)
        .filter(|(&x, &y)| x && !y)
        .count();
    let c = baseline
        .iter()
        .zip(other)
        .filter(|(&x, &y)| !x && y)
        .count();
    let (difference, difference_ci) = paired_difference(b, c, n);
    Paired {
        baseline_only: b,
        other_only: c,
        n,
        difference,
        difference_ci,
        p_value: mcnemar_exact(b, c),
    }
}

/// The paired difference in accuracy, (c - b) / n, and its Wald 95% interval, from the
/// discordant counts `b` (baseline only) and `c` (other only) out of `n` items.
pub fn paired_difference(b: usize, c: usize, n: usize) -> (f64, Interval) {
    if n == 0 {
        return (
            0.0,
            Interval {
                low: 0.0,
                high: 0.0,
            },
        );
    }
    let (b, c, n) = (b as f64, c as f64, n as f64);
    let d = (c - b) / n;
    let variance = ((b + c) - (c - b) * (c - b) / n) / (n * n);
    let half = Z95 * variance.max(0.0).sqrt();
    (
        d,
        Interval {
            low: d - half,
            high: d + half,
        },
    )
}

/// Exact two-sided McNemar test: under the null each discordant pair goes either way with
/// probability 1/2, so p = min(1, 2 P[X <= min(b, c)]) with X ~ Binomial(b + c, 1/2).
pub fn mcnemar_exact(b: usize, c: usize) -> f64 {
    let n = b + c;
    if n == 0 {
        return 1.0;
    }
    let k = b.min(c);
    // Sum in log space: 2^-n underflows past n = 1074.
    let ln_half_n = -(n as f64) * std::f64::consts::LN_2;
    let mut ln_choose = 0.0; // ln C(n, 0)
    let mut tail = (ln_half_n).exp();
    for i in 1..=k {
        ln_choose += ((n - i + 1) as f64).ln() - (i as f64).ln();
        tail += (ln_choose + ln_half_n).exp();
    }
    (2.0 * tail).min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() < tol
    }

    #[test]
    fn wilson_matches_published_values() {
        // 8/10: (0.4902, 0.9433); 0/20: (0, 0.1611); 50/100: (0.4038, 0.5962).
        let i = wilson(8, 10);
        assert!(
            close(i.low, 0.4902, 1e-4) && close(i.high, 0.9433, 1e-4),
            "{i:?}"
        );
        let i = wilson(0, 20);
        assert!(
            close(i.low, 0.0, 1e-12) && close(i.high, 0.1611, 1e-4),
            "{i:?}"
        );
        let i = wilson(50, 100);
        assert!(
            close(i.low, 0.4038, 1e-4) && close(i.high, 0.5962, 1e-4),
            "{i:?}"
        );
    }

    #[test]
    fn exact_mcnemar_matches_the_binomial_tail() {
        // b = 1, c = 9: 2 (1 + 10) / 1024.
        assert!(close(mcnemar_exact(1, 9), 22.0 / 1024.0, 1e-15));
        assert!(close(mcnemar_exact(9, 1), 22.0 / 1024.0, 1e-15));
        // b = 2, c = 12: 2 (1 + 14 + 91) / 16384 = 0.012939...
        assert!(close(mcnemar_exact(2, 12), 212.0 / 16384.0, 1e-15));
        assert_eq!(mcnemar_exact(5, 5), 1.0);
        assert_eq!(mcnemar_exact(0, 0), 1.0);
        // Large counts (2^-2000 underflows in plain f64); exact value from Python's integers.
        let p = mcnemar_exact(950, 1050);
        assert!(close(p, 0.026_824_146_240, 1e-9), "{p}");
    }

    #[test]
    fn paired_difference_counts_discordant_items() {
        let baseline = [true, true, false, false, true, false];
        let other = [true, false, true, true, true, false];
        let p = paired(&baseline, &other);
        assert_eq!((p.baseline_only, p.other_only, p.n), (1, 2, 6));
        assert!(close(p.difference, 1.0 / 6.0, 1e-12));
        // b = 10, c = 20, n = 100: d = 0.1, se = sqrt(30 - 1) / 100.
        let (d, ci) = paired_difference(10, 20, 100);
        let half = Z95 * 29f64.sqrt() / 100.0;
        assert!(close(d, 0.1, 1e-12));
        assert!(close(ci.low, 0.1 - half, 1e-12) && close(ci.high, 0.1 + half, 1e-12));
        assert!(close(ci.low, -0.00555, 1e-4));
    }
}
