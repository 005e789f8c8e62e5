//! Property tests (fuzzing with proptest) of everything that reads bytes or
//! text port-trace did not write itself: ring-buffer records, filter
//! arguments, and the tracker fed whatever decodes. None may panic.

use port_trace::clock::BootClock;
use port_trace::decode::KernelEvent;
use port_trace::filter::{parse_pids, parse_port_ranges, Filter};
use port_trace::output::{Format, Output};
use port_trace::pipeline::Pipeline;
use port_trace::tracker::{Keying, Tracker};
use port_trace_common::{kind, RawEvent};
use proptest::prelude::*;

const RAW_SIZE: usize = std::mem::size_of::<RawEvent>();

/// A ring-buffer record with plausible kinds, families and protocols (so
/// that most decode and reach the tracker) and arbitrary everything else.
fn plausible_record() -> impl Strategy<Value = Vec<u8>> {
    (
        proptest::collection::vec(any::<u8>(), RAW_SIZE),
        1u16..=12,
        prop_oneof![Just(2u16), Just(10u16), any::<u16>()],
        prop_oneof![Just(6u16), Just(17u16), any::<u16>()],
        0u64..8,
        0u16..4,
    )
        .prop_map(|(mut bytes, kind, family, protocol, cookie, lport)| {
            // SAFETY: RawEvent is plain integers; any bytes are a value.
            let mut raw: RawEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
            raw.kind = kind;
            raw.family = family;
            raw.protocol = protocol;
            raw.cookie = cookie; // few cookies, so events of one socket meet
            raw.lport = 40000 + lport;
            raw.old_state %= 14;
            raw.new_state %= 14;
            // SAFETY: writes size_of::<RawEvent>() bytes into a buffer that long.
            unsafe { std::ptr::write_unaligned(bytes.as_mut_ptr().cast(), raw) };
            bytes
        })
}

fn sink() -> Output {
    Output::new(Box::new(std::io::sink()), Format::Json, false, BootClock::with_offset_ns(0))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    /// Arbitrary bytes of any length: decoded or refused, never a panic.
    #[test]
    fn decoder_takes_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..(2 * RAW_SIZE))) {
        let decoded = KernelEvent::try_from(bytes.as_slice());
        if bytes.len() < RAW_SIZE {
            prop_assert!(decoded.is_err());
        }
    }

    /// Streams of plausible records through decode, tracker, filter and JSON
    /// output, with both keyings and a tiny limit: no panic, and the
    /// tracker's counts stay consistent.
    #[test]
    fn pipeline_takes_any_stream(records in proptest::collection::vec(plausible_record(), 1..200), by_address: bool) {
        let keying = if by_address { Keying::Address { mask: 0x55 } } else { Keying::Cookie };
        let mut pipeline = Pipeline::with_tracker(Filter::default(), Tracker::with_keying(keying).with_limit(16));
        let mut output = sink();
        for record in &records {
            pipeline.feed(record, &mut |rec: &port_trace::record::PortRecord| output.record(rec)).unwrap();
        }
        prop_assert!(pipeline.tracker.ports_in_use() <= pipeline.tracker.tracked());
        prop_assert!(pipeline.tracker.time_wait_ports() <= pipeline.tracker.ports_in_use());
        prop_assert!(pipeline.tracker.tracked() <= 16);
    }

    /// Any text given to --port and --pid: parsed or refused with a message.
    #[test]
    fn filter_parsers_take_any_text(text in ".{0,40}") {
        if let Err(message) = parse_port_ranges(&text) {
            prop_assert!(!message.is_empty());
        }
        if let Err(message) = parse_pids(&text) {
            prop_assert!(!message.is_empty());
        }
    }

    /// Every valid port list parses back to what was written.
    #[test]
    fn port_ranges_round_trip(ranges in proptest::collection::vec((1u16..=65535, 0u16..100), 1..6)) {
        let ranges: Vec<(u16, u16)> = ranges.into_iter().map(|(lo, len)| (lo, lo.saturating_add(len))).collect();
        let text = ranges.iter().map(|(lo, hi)| if lo == hi { lo.to_string() } else { format!("{lo}-{hi}") }).collect::<Vec<_>>().join(",");
        let parsed = parse_port_ranges(&text).unwrap();
        prop_assert_eq!(parsed, ranges.iter().map(|(lo, hi)| *lo..=*hi).collect::<Vec<_>>());
    }
}

/// Every event kind the ABI defines decodes from a well-formed record.
#[test]
fn every_kind_decodes() {
    for k in [
        kind::TCP_STATE,
        kind::TCP_DESTROY,
        kind::BIND,
        kind::CONNECT,
        kind::UDP_RELEASE,
        kind::GET_PORT,
        kind::PUT_PORT,
        kind::TIME_WAIT_START,
        kind::TIME_WAIT_END,
        kind::BIND_FAILED,
        kind::UDP_FIRST_SEND,
        kind::SNAPSHOT,
    ] {
        let raw = RawEvent { kind: k, family: 2, protocol: 6, old_state: 7, new_state: 2, ..Default::default() };
        assert!(KernelEvent::try_from(&raw).is_ok(), "kind {k}");
    }
}
