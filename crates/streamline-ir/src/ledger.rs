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
    /// Live bytes when each group began.
    group_entries: Vec<usize>,
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
            self.group_entries.resize(group + 1, 0);
        }
        self.group_entries[group] = self.live;
        self.group = Some(group);
        self.see(self.live);
    }

    /// Peak live bytes while each group ran (0 for groups that did not run).
    pub fn group_peaks(&self) -> &[usize] {
        &self.group_peaks
    }

    /// Live bytes when each group began (0 for groups that did not run).
    pub fn group_entries(&self) -> &[usize] {
        &self.group_entries
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
    /// Live bytes when each plan group began (0 for groups that did not run): what earlier
    /// groups left alive, which no setting of the group itself can lower.
    pub group_entries: Vec<usize>,
}

/// Bytes for people: `1.50 GiB`, `320.0 MiB`, `12.0 KiB`, `7 B`.
pub fn human(bytes: usize) -> String {
    const UNITS: [(&str, f64); 3] = [
        ("GiB", (1u64 << 30) as f64),
        ("MiB", (1u64 << 20) as f64),
        ("KiB", 1024.0),
    ];
    let b = bytes as f64;
    match UNITS.iter().find(|(_, size)| b >= *size) {
        Some((unit, size)) if *unit == "GiB" => format!("{:.2} {unit}", b / size),
        Some((unit, size)) => format!("{:.1} {unit}", b / size),
        None => format!("{bytes} B"),
    }
}
