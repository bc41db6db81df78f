/** The four feeds, named as their tables. */
export type Feed =
  | "appointments"
  | "availability"
  | "consultation_sessions"
  | "consultation_messages";

export const FEEDS: readonly Feed[] = [
  "appointments",
  "availability",
  "consultation_sessions",
  "consultation_messages",
];

export type Role = "admin" | "dentist" | "patient" | "chatbot";

/** Timestamps arrive as RFC 3339 strings, uuids as strings. */
export interface Appointment {
  id: string;
  /** Absent for the chatbot, which sees slot columns only. */
  patient_id?: string;
  dentist_id: string;
  starts_at: string;
  ends_at: string;
  status: "booked" | "confirmed" | "cancelled" | "completed";
  kind: "in_person" | "video" | "audio" | "chat";
  /** Absent for the chatbot. */
  notes?: string | null;
  created_at?: string;
}

export interface Availability {
  id: string;
  dentist_id: string;
  starts_at: string;
  ends_at: string;
  is_available: boolean;
  created_at: string;
}

export interface ConsultationSession {
  id: string;
  appointment_id: string | null;
  patient_id: string;
  dentist_id: string;
  status: "waiting" | "active" | "ended";
  started_at: string | null;
  ended_at: string | null;
  notes: string | null;
  /** Derived: ended_at - started_at, as Postgres prints an interval; null until both are set. */
  duration: string | null;
  created_at: string;
}

export interface ConsultationMessage {
  id: string;
  session_id: string;
  sender_id: string;
  body: string;
  /** The id the sending client chose; null for messages written by other means. */
  client_id: string | null;
  created_at: string;
}

/** The row type of each feed. */
export interface FeedRow {
  appointments: Appointment;
  availability: Availability;
  consultation_sessions: ConsultationSession;
  consultation_messages: ConsultationMessage;
}

/** INSERT, UPDATE or DELETE as this user sees the change (a row moved away is a DELETE). */
export type Op = "INSERT" | "UPDATE" | "DELETE";

export interface ChangeEvent<F extends Feed = Feed> {
  feed: F;
  op: Op;
  /** The event's id in the relay's log, increasing in commit order. */
  id: number;
  /** Where to resume after this event; opaque. */
  cursor: string;
  /** The row now; for a DELETE, as this user last saw it. */
  row: FeedRow[F];
  /** UPDATE and DELETE: the row before. */
  old?: FeedRow[F];
  /** When the change was committed (RFC 3339, UTC). */
  at: string;
}

export interface Member {
  user_id: string;
  role: Role;
}

/** Who joined and left a consultation session; the first for a session lists everyone there. */
export interface PresenceEvent {
  session_id: string;
  joined: Member[];
  left: Member[];
  /**
   * Set by the client: this is the session's first frame since the `consultation_messages`
   * subscription was (re)made, the whole list of who is there. Replace what you hold for the
   * session rather than add to it: after a reconnect, people who left meanwhile are not in `left`.
   */
  first: boolean;
}

export type ConnectionState = "connecting" | "open" | "reconnecting" | "closed";

/** An `error` frame from the relay. */
export interface RelayError {
  code: string;
  message: string;
  ref?: string;
}
