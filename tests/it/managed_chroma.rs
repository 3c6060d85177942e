//! The managed `chroma run`: started, answers its heartbeat, restarted after being killed,
//! stopped on drop.

use std::time::Duration;

use docusearch_agent::chroma::managed::{heartbeat, running_server, ManagedChroma};

use crate::common::{self, signal, wait_until};

#[test]
fn managed_chroma_starts_restarts_and_stops() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("chroma");
    let server = ManagedChroma::start(&common::chroma_bin(), &data).expect("managed chroma starts");
    let port = server.port();
    assert!(server.url().starts_with("http://127.0.0.1:"));
    assert!(heartbeat(port), "answers its heartbeat once started");
    assert_eq!(server.starts(), 1);
    assert!(data.join("chroma-server.pid").is_file(), "records its pid");
    assert_eq!(
        running_server(&data),
        Some(server.url()),
        "other commands find the live server"
    );

    // Kill it behind the supervisor's back: it must come back on the same port.
    let pid = server.pid().expect("a running server has a pid");
    signal(pid, libc::SIGKILL);
    assert!(
        wait_until(Duration::from_secs(60), || server.starts() == 2
            && heartbeat(port)),
        "restarted after SIGKILL (starts = {})",
        server.starts()
    );
    let new_pid = server.pid().unwrap();
    assert_ne!(pid, new_pid);

    drop(server);
    assert!(!heartbeat(port), "stopped on drop");
    // The process is gone, not just deaf.
    assert!(
        wait_until(Duration::from_secs(5), || unsafe {
            libc::kill(new_pid as i32, 0)
        } != 0),
        "chroma process {new_pid} still exists after drop"
    );
    assert!(!data.join("chroma-server.pid").exists(), "pid file removed");
    assert_eq!(running_server(&data), None);
}

#[test]
fn missing_chroma_program_names_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let err = ManagedChroma::start(&dir.path().join("no-such-chroma"), &dir.path().join("data"))
        .err()
        .expect("starting a missing program fails");
    let msg = err.to_string();
    assert!(
        msg.contains("no-such-chroma") && msg.contains("scripts/setup"),
        "{msg}"
    );
}
