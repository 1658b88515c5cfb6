//! Persistence across restarts, and SIGKILL in the middle of work.
