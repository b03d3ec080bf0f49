// app/chat/[id]/page.tsx — one chat per URL, so a reload resumes the same chat
import Chat from './chat';

export default async function Page({ params }: { params: Promise<{ id: string }> }) {
  const { id } = await params;
  return <Chat id={id} />;
}
