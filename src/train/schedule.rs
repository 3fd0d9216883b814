//! The learning rate at each step: constant, cosine annealing to zero (torch's
//! CosineAnnealingLR stepped every step), or step decay (x0.1 at 5/8, 3/4 and 7/8 of the
//! steps: RepDistiller's epochs 150, 180 and 210 of 240).

/// How the learning rate changes over a stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScheduleKind {
    Constant,
    Cosine,
    Step,
}

/// A stage's schedule: the base rate and the stage's number of steps.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub base: f32,
    pub steps: u64,
}

/// Where step decay multiplies the rate by 0.1, as fractions of the stage.
const DECAY_AT: [f64; 3] = [5.0 / 8.0, 6.0 / 8.0, 7.0 / 8.0];

impl Schedule {
    /// The rate of step `step` (1 at the first step).
    pub fn rate(&self, step: u64) -> f32 {
        let done = step.saturating_sub(1) as f64;
        let total = self.steps.max(1) as f64;
        let base = self.base as f64;
        let rate = match self.kind {
            ScheduleKind::Constant => base,
            ScheduleKind::Cosine => {
                base * 0.5 * (1.0 + (std::f64::consts::PI * done / total).cos())
            }
            ScheduleKind::Step => {
                let decays = DECAY_AT.iter().filter(|&&at| done >= at * total).count();
                base * 0.1f64.powi(decays as i32)
            }
        };
        rate as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_starts_at_the_base_and_halves_midway() {
        let s = Schedule {
            kind: ScheduleKind::Cosine,
            base: 0.1,
            steps: 100,
        };
        assert_eq!(s.rate(1), 0.1);
        assert!((s.rate(51) - 0.05).abs() < 1e-7);
    }

    #[test]
    fn step_decays_at_five_eighths() {
        let s = Schedule {
            kind: ScheduleKind::Step,
            base: 1.0,
            steps: 240,
        };
        assert_eq!(s.rate(150), 1.0);
        assert!((s.rate(151) - 0.1).abs() < 1e-7);
        assert!((s.rate(240) - 0.001).abs() < 1e-9);
    }
}
