//! The memory budget of a controller's process instances
//! (`INSTANCE_MEMORY_MB`): each instance reserves its memory cap (the
//! manifest's `limits.memory_mb`, which its memory cgroup enforces) for its
//! life, and an instance whose cap does not fit is not started. Each cap
//! alone bounds one instance; the budget bounds them together, so that
//! many tokens with retained sessions, or a burst of cold starts, cannot
//! take the machine's memory from the controller, the database and each
//! other. The pool makes room by stopping idle instances, or waits for a
//! busy one to end ([`fnrt_core::runtime::InstanceError::Exhausted`]).
//!
//! # Layout
//!
//! - [`MemoryBudget`]: the total and what is reserved; [`Reservation`]:
//!   one instance's share, given back when dropped.
//! - [`machine_memory_mb`]: the default's basis, from `/proc/meminfo`.

use std::sync::{Arc, Mutex};

/// The memory process instances may reserve together, in MiB.
#[derive(Debug)]
pub struct MemoryBudget {
    total_mb: u64,
    reserved_mb: Mutex<u64>,
}

/// Why an instance's cap was not reserved.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The rest of the budget is reserved: later, maybe.
    Full { reserved_mb: u64, total_mb: u64 },
    /// Larger than the whole budget: never.
    TooLarge { total_mb: u64 },
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Full { reserved_mb, total_mb } => write!(
                f,
                "the instances on this controller hold {reserved_mb} of its {total_mb} MiB (INSTANCE_MEMORY_MB)"
            ),
            Refusal::TooLarge { total_mb } => write!(
                f,
                "more than all the memory this controller's instances may have ({total_mb} MiB, INSTANCE_MEMORY_MB)"
            ),
        }
    }
}

impl MemoryBudget {
    pub fn new(total_mb: u64) -> Arc<Self> {
        Arc::new(MemoryBudget {
            total_mb,
            reserved_mb: Mutex::new(0),
        })
    }

    /// Whether `mb` could ever be reserved: no larger than the whole budget.
    pub fn fits_at_all(&self, mb: u64) -> Result<(), Refusal> {
        match mb > self.total_mb {
            true => Err(Refusal::TooLarge {
                total_mb: self.total_mb,
            }),
            false => Ok(()),
        }
    }

    /// Reserves `mb` for one instance, if it fits.
    pub fn reserve(self: &Arc<Self>, mb: u64) -> Result<Reservation, Refusal> {
        self.fits_at_all(mb)?;
        let mut reserved = self.reserved_mb.lock().unwrap();
        if *reserved + mb > self.total_mb {
            return Err(Refusal::Full {
                reserved_mb: *reserved,
                total_mb: self.total_mb,
            });
        }
        *reserved += mb;
        Ok(Reservation {
            mb,
            budget: self.clone(),
        })
    }
}

/// One instance's share of the budget, given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    mb: u64,
    budget: Arc<MemoryBudget>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        *self.budget.reserved_mb.lock().unwrap() -= self.mb;
    }
}

/// The machine's memory (`MemTotal`), in MiB, if it can be read.
pub fn machine_memory_mb() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_reserved_is_given_back_and_what_never_fits_says_so() {
        let budget = MemoryBudget::new(512);
        let a = budget.reserve(256).unwrap();
        let _b = budget.reserve(256).unwrap();
        assert_eq!(
            budget.reserve(64).unwrap_err(),
            Refusal::Full {
                reserved_mb: 512,
                total_mb: 512
            }
        );
        drop(a);
        let _c = budget.reserve(64).unwrap();
        assert_eq!(budget.reserve(1024).unwrap_err(), Refusal::TooLarge { total_mb: 512 });
        assert!(machine_memory_mb().is_some_and(|mb| mb > 0));
    }
}
