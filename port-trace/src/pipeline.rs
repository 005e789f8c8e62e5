//! From ring-buffer bytes to filtered records: decode, track, filter, count.
//! Pure; the live loop and tests drive it the same way.

use crate::decode::KernelEvent;
use crate::filter::Filter;
use crate::output::Counts;
use crate::record::PortRecord;
use crate::tracker::{Keying, Tracker};

/// Where the pipeline's records go.
pub trait RecordSink {
    /// What stops the pipeline.
    type Error;
    /// Every record the tracker produced, filters not applied (the kernel's
    /// port pools are shared by everything traced).
    fn observe(&mut self, _rec: &PortRecord) -> Result<(), Self::Error> {
        Ok(())
    }
    /// A record that passed the user's filters.
    fn record(&mut self, rec: &PortRecord) -> Result<(), Self::Error>;
}

impl<E, F: FnMut(&PortRecord) -> Result<(), E>> RecordSink for F {
    type Error = E;
    fn record(&mut self, rec: &PortRecord) -> Result<(), E> {
        self(rec)
    }
}

/// The userspace half of a trace.
pub struct Pipeline {
    /// The lifecycle state machine.
    pub tracker: Tracker,
    filter: Filter,
    /// Records passed to the sink, per type.
    pub counts: Counts,
    /// Records that could not be decoded.
    pub decode_errors: u64,
    scratch: Vec<PortRecord>,
}

impl Pipeline {
    /// A pipeline reporting what passes `filter`, joining events as
    /// `keying` says.
    pub fn new(filter: Filter, keying: Keying) -> Self {
        Self::with_tracker(filter, Tracker::with_keying(keying))
    }

    /// A pipeline around a given tracker.
    pub fn with_tracker(filter: Filter, tracker: Tracker) -> Self {
        Self { tracker, filter, counts: Counts::default(), decode_errors: 0, scratch: Vec::new() }
    }

    /// Ends a socket walk (see [`Tracker::end_walk`]), passing what it
    /// produces through the filter to `sink`.
    pub fn end_walk<S: RecordSink>(&mut self, ts_ns: u64, sink: &mut S) -> Result<(), S::Error> {
        self.tracker.end_walk(ts_ns, &mut self.scratch);
        self.pass_on(sink)
    }

    /// Hands the tracker's new records that pass the filter to `sink`,
    /// counting them; stops at the sink's first error.
    fn pass_on<S: RecordSink>(&mut self, sink: &mut S) -> Result<(), S::Error> {
        let mut result = Ok(());
        for rec in self.scratch.drain(..) {
            if result.is_ok() {
                result = sink.observe(&rec);
            }
            if result.is_ok() && self.filter.matches(&rec) {
                self.counts.add(&rec.body);
                result = sink.record(&rec);
            }
        }
        result
    }

    /// Feeds one ring-buffer record; calls `sink` for every record that
    /// passes the filter. Stops at the sink's first error.
    pub fn feed<S: RecordSink>(&mut self, bytes: &[u8], sink: &mut S) -> Result<(), S::Error> {
        let event = match KernelEvent::try_from(bytes) {
            Ok(event) => event,
            Err(_) => {
                self.decode_errors += 1;
                return Ok(());
            }
        };
        self.tracker.on_event(&event, &mut self.scratch);
        self.pass_on(sink)
    }
}

#[cfg(test)]
mod tests {
    use port_trace_common::{flags, kind, RawEvent};

    use super::*;
    use crate::model::Proto;

    fn bytes(raw: &RawEvent) -> Vec<u8> {
        // SAFETY: RawEvent has no padding.
        unsafe { std::slice::from_raw_parts((raw as *const RawEvent).cast::<u8>(), std::mem::size_of::<RawEvent>()) }
            .to_vec()
    }

    #[test]
    fn decodes_tracks_filters_and_counts() {
        let mut pipeline = Pipeline::new(Filter { proto: Some(Proto::Udp), ..Default::default() }, Keying::Cookie);
        let mut raw = RawEvent {
            kind: kind::BIND,
            family: 2,
            protocol: 17,
            lport: 5000,
            cookie: 1,
            flags: flags::PROCESS_CONTEXT,
            ..Default::default()
        };
        let mut seen = Vec::new();
        pipeline
            .feed(&bytes(&raw), &mut |r: &PortRecord| -> Result<(), ()> {
                seen.push(r.clone());
                Ok(())
            })
            .unwrap();
        raw.protocol = 6;
        raw.cookie = 2;
        pipeline
            .feed(&bytes(&raw), &mut |r: &PortRecord| -> Result<(), ()> {
                seen.push(r.clone());
                Ok(())
            })
            .unwrap();
        pipeline.feed(&[1, 2, 3], &mut |_: &PortRecord| -> Result<(), ()> { Ok(()) }).unwrap();
        assert_eq!(seen.len(), 1, "the TCP bind is filtered out");
        assert_eq!(pipeline.counts.alloc, 1);
        assert_eq!(pipeline.decode_errors, 1);
        assert_eq!(pipeline.tracker.ports_in_use(), 2, "filtering does not change tracking");
    }
}
