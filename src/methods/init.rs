//! Deterministic parameter initialisation: each parameter's values follow from its name alone, so
//! a merge writes the same bytes every time.

/// A SplitMix64 stream seeded by the FNV-1a hash of a name.
pub struct Stream(u64);

impl Stream {
    pub fn for_name(name: &str) -> Self {
        let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
        Stream(hash)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// `count` values from N(0, std^2) (Box-Muller).
    pub fn normal(&mut self, count: usize, std: f64) -> Vec<f32> {
        (0..count)
            .map(|_| {
                let u1 = self.unit().max(f64::MIN_POSITIVE);
                let u2 = self.unit();
                ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * std) as f32
            })
            .collect()
    }

    /// `count` values uniform in [-bound, bound].
    pub fn uniform(&mut self, count: usize, bound: f64) -> Vec<f32> {
        (0..count)
            .map(|_| ((self.unit() * 2.0 - 1.0) * bound) as f32)
            .collect()
    }
}

/// PyTorch's default for Conv2d and Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias.
pub fn torch_default(name: &str, count: usize, fan_in: i64) -> Vec<f32> {
    Stream::for_name(name).uniform(count, 1.0 / (fan_in as f64).sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_name_same_values_and_within_bounds() {
        let a = torch_default("kd/at/w", 1000, 16);
        assert_eq!(a, torch_default("kd/at/w", 1000, 16));
        assert!(a.iter().all(|v| v.abs() <= 0.25));
        assert_ne!(a, torch_default("kd/at/v", 1000, 16));
    }

    #[test]
    fn normal_has_the_asked_spread() {
        let v = Stream::for_name("x").normal(20000, 2.0);
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!(
            mean.abs() < 0.05 && (var.sqrt() - 2.0).abs() < 0.05,
            "mean {mean} std {}",
            var.sqrt()
        );
    }
}
