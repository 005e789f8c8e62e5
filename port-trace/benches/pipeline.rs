//! Userspace throughput: decoding, lifecycle tracking and JSON formatting of
//! a recorded-like event stream, events per second on one core.
//! `cargo bench -p port-trace --bench pipeline`.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use port_trace::clock::BootClock;
use port_trace::filter::Filter;
use port_trace::output::{Format, Output};
use port_trace::pipeline::Pipeline;
use port_trace::tracker::Keying;
use port_trace_common::{flags, kind, RawEvent};

fn bytes(raw: &RawEvent) -> Vec<u8> {
    // SAFETY: RawEvent is plain integers without padding.
    unsafe { std::slice::from_raw_parts((raw as *const RawEvent).cast::<u8>(), std::mem::size_of::<RawEvent>()) }
        .to_vec()
}

/// The portable backend's events for `n` short TCP client connections
/// (connect, handshake, passive close) and `n` UDP bind/close pairs.
fn stream(n: u64) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let base = RawEvent {
        family: 2,
        protocol: 6,
        pid_tgid: 4242 << 32 | 4242,
        netns: 4026531840,
        laddr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        raddr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        comm: *b"curl\0\0\0\0\0\0\0\0\0\0\0\0",
        syscall_nr: -1,
        ..RawEvent::default()
    };
    for i in 0..n {
        let cookie = 2 * i + 1;
        let port = 32768 + (i % 28000) as u16;
        let ts = i * 10_000;
        let state = |old: u8, new: u8, held: u16, ts: u64| {
            let mut ev = base;
            ev.kind = kind::TCP_STATE;
            ev.cookie = cookie;
            ev.ts_ns = ts;
            ev.old_state = old;
            ev.new_state = new;
            ev.lport = port;
            ev.rport = 8080;
            ev.req_port = held;
            ev
        };
        let mut connecting = state(7, 2, 0, ts);
        connecting.flags = flags::PROCESS_CONTEXT;
        connecting.lport = 0;
        out.push(bytes(&connecting));
        out.push(bytes(&state(2, 1, port, ts + 100)));
        let mut connect = state(0, 0, 0, ts + 150);
        connect.kind = kind::CONNECT;
        connect.flags = flags::PROCESS_CONTEXT;
        out.push(bytes(&connect));
        out.push(bytes(&state(1, 8, port, ts + 1000)));
        out.push(bytes(&state(8, 9, port, ts + 1100)));
        out.push(bytes(&state(9, 7, 0, ts + 1200)));
        let mut udp = base;
        udp.protocol = 17;
        udp.cookie = cookie + 1;
        udp.lport = port;
        udp.flags = flags::PROCESS_CONTEXT;
        udp.raddr = [0; 16];
        udp.kind = kind::BIND;
        udp.ts_ns = ts + 2000;
        out.push(bytes(&udp));
        udp.kind = kind::UDP_RELEASE;
        udp.ts_ns = ts + 3000;
        out.push(bytes(&udp));
    }
    out
}

fn pipeline(c: &mut Criterion) {
    let events = stream(20_000);
    let mut group = c.benchmark_group("pipeline");
    group.throughput(Throughput::Elements(events.len() as u64));
    for (name, format) in [("json", Format::Json), ("text", Format::Text)] {
        group.bench_function(name, |b| {
            b.iter_batched(
                || {
                    let output = Output::new(Box::new(std::io::sink()), format, false, BootClock::with_offset_ns(0));
                    (Pipeline::new(Filter::default(), Keying::Cookie), output)
                },
                |(mut pipeline, mut output)| {
                    for event in &events {
                        pipeline.feed(event, &mut |rec: &port_trace::record::PortRecord| output.record(rec)).unwrap();
                    }
                    assert_eq!(pipeline.counts.alloc, 40_000);
                },
                BatchSize::LargeInput,
            )
        });
    }
    group.bench_function("decode+track (no output)", |b| {
        b.iter_batched(
            || Pipeline::new(Filter::default(), Keying::Cookie),
            |mut pipeline| {
                for event in &events {
                    pipeline.feed(event, &mut |_: &port_trace::record::PortRecord| Ok::<(), ()>(())).unwrap();
                }
                assert_eq!(pipeline.counts.release, 40_000);
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
