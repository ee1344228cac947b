//! Fuzzes the framed stream reader (`farm_nix::wire::FramedReader`, how the
//! worker protocol carries NARs): no panics, and whenever it reaches the
//! terminator it must have yielded exactly the frames' payload, in order, and
//! left the underlying reader right after the terminator.
#![no_main]

use farm_nix::wire::FramedReader;
use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncReadExt;

static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let rt = RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
    });
    let max_frame = 64;
    // The payload and where the terminator ends, decoded by hand; `None` if
    // the stream is truncated or has a frame over the limit.
    let expected = expected_payload(data, max_frame);
    rt.block_on(async {
        let mut input: &[u8] = data;
        let mut framed = FramedReader::new(&mut input, max_frame);
        let mut payload = Vec::new();
        let result = framed.read_to_end(&mut payload).await;
        let done = framed.is_done();
        match (&expected, result) {
            (Some((want, end)), Ok(n)) => {
                assert!(done);
                assert_eq!(n, want.len());
                assert_eq!(&payload, want);
                assert_eq!(
                    input.len(),
                    data.len() - end,
                    "not positioned after the terminator"
                );
            }
            (None, Err(_)) => assert!(!done),
            (Some(_), Err(e)) => panic!("valid framed stream rejected: {e}"),
            (None, Ok(_)) => panic!("invalid framed stream accepted"),
        }
    });
});

fn expected_payload(data: &[u8], max_frame: u64) -> Option<(Vec<u8>, usize)> {
    let mut pos = 0;
    let mut out = Vec::new();
    loop {
        let len = u64::from_le_bytes(data.get(pos..pos + 8)?.try_into().ok()?);
        pos += 8;
        if len == 0 {
            return Some((out, pos));
        }
        if len > max_frame {
            return None;
        }
        out.extend_from_slice(data.get(pos..pos + len as usize)?);
        pos += len as usize;
    }
}
