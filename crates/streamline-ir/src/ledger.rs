//! Byte accounting shared by the dry run (planned peak) and real runs (measured peak).

/// Live bytes over time, with their peak.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ledger {
    live: usize,
    peak: usize,
    /// The group running now, and the one that was running at the peak.
    group: Option<usize>,
    peak_group: Option<usize>,
    /// Peak of live bytes while each group ran.
    group_peaks: Vec<usize>,
}

impl Ledger {
    pub fn alloc(&mut self, bytes: usize) {
        self.live += bytes;
        self.see(self.live);
    }

    fn see(&mut self, bytes: usize) {
        if bytes > self.peak {
            self.peak = bytes;
            self.peak_group = self.group;
        }
        if let Some(g) = self.group {
            self.group_peaks[g] = self.group_peaks[g].max(bytes);
        }
    }

    /// Attribute what follows to plan group `group`.
    pub fn enter_group(&mut self, group: usize) {
        if self.group_peaks.len() <= group {
            self.group_peaks.resize(group + 1, 0);
        }
        self.group = Some(group);
        self.see(self.live);
    }

    /// Peak live bytes while each group ran (0 for groups that did not run).
    pub fn group_peaks(&self) -> &[usize] {
        &self.group_peaks
    }

    /// The group during which the peak was reached (`None`: before any group ran).
    pub fn peak_group(&self) -> Option<usize> {
        self.peak_group
    }

    pub fn free(&mut self, bytes: usize) {
        self.live = self.live.saturating_sub(bytes);
    }

    /// A buffer that lives only while one op runs (its workspace).
    pub fn transient(&mut self, bytes: usize) {
        self.see(self.live + bytes);
    }

    pub fn live(&self) -> usize {
        self.live
    }

    pub fn peak(&self) -> usize {
        self.peak
    }
}

/// What one run (real or dry) cost.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunStats {
    /// Peak of live activation bytes, inputs included, op workspaces included in dry runs.
    pub peak_bytes: usize,
    /// Floating-point operations of the nodes that ran.
    pub flops: u64,
    /// Nodes that ran (substituted and pruned nodes do not).
    pub nodes_run: usize,
    /// The plan group during which the peak was reached.
    pub peak_group: Option<usize>,
    /// Peak live bytes while each plan group ran (0 for groups that did not run).
    pub group_peaks: Vec<usize>,
}
