import Chat from "./chat";

// The chat id comes from the URL (?chat=...), so a reload resumes the same chat.
export default async function Page({ searchParams }: { searchParams: Promise<{ chat?: string }> }) {
  const { chat } = await searchParams;
  return <Chat id={chat ?? "demo"} />;
}
